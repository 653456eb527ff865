"""ScoreCAM, AblationCAM and EigenCAM against pytorch-grad-cam, for class logits and proxy scores, and the
engine's guarantees for them."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
from nets import AsModule, Penultimate, SmallNet, corr, trained_looking
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
from torch import nn

from cubcam.cams import CAM, EmbeddingCAM, GradCAM, normalized_mean_proxies
from cubcam.cams.gradient_free import eigen_projection
from cubcam.cams.protocol import HeadExplainer, explain, explainer_for
from cubcam.cams.targets import make_target

TARGETS = [4, 0, 2, 1]


PGC = {"scorecam": pgc.ScoreCAM, "ablationcam": pgc.AblationCAM, "eigencam": pgc.EigenCAM}


@pytest.fixture(scope="module")
def net() -> SmallNet:
    torch.manual_seed(0)
    return trained_looking(SmallNet())


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _proxies(net: SmallNet, images: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    embedder = Penultimate(net)
    with torch.no_grad():
        embeddings = embedder(images)
    return embedder, normalized_mean_proxies(embeddings, torch.tensor([0, 1, 0, 1]))[torch.tensor([1, 0, 0, 1])]


def _close(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    assert np.abs(ours - theirs).max() < 1e-2, what
    assert corr(ours, theirs) > 0.999, what


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_scored_methods_match_pytorch_grad_cam_for_classes_and_proxies(net, images, method):
    ours = GradCAM(net, net.features, method=method)(images, torch.tensor(TARGETS)).numpy()
    with PGC[method](model=net, target_layers=[net.features]) as cam:
        theirs = cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in TARGETS])
    _close(ours, theirs, f"{method}, classes")

    embedder, proxies = _proxies(net, images)
    ours = EmbeddingCAM(embedder, "net.features", method=method)(images, proxies).numpy()
    with PGC[method](model=embedder, target_layers=[net.features]) as cam:
        theirs = cam(input_tensor=images, targets=[lambda output, p=p: output @ p for p in proxies])
    _close(ours, theirs, f"{method}, proxies")


def test_eigencam_matches_pytorch_grad_cam_up_to_the_sign_it_leaves_open(net, images):
    with torch.no_grad():
        activations = net.forward_features(images)
    theirs_signed = torch.from_numpy(get_2d_projection(activations.numpy()))
    ours_signed = eigen_projection(activations)
    agree = (ours_signed * theirs_signed).flatten(1).sum(1) > 0
    torch.testing.assert_close(ours_signed.abs(), theirs_signed.abs(), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(
        ours_signed, theirs_signed * torch.where(agree, 1.0, -1.0)[:, None, None], atol=1e-4, rtol=1e-3
    )
    # our convention: the projection correlates positively with the mean activation over the channels
    mean = activations.mean(1)
    assert all(corr(o.numpy(), m.numpy()) > 0 for o, m in zip(ours_signed, mean))
    assert agree.any() and not agree.all(), "the fixture should show both cases"

    ours = GradCAM(net, net.features, method="eigencam")(images).numpy()
    with pgc.EigenCAM(model=net, target_layers=[net.features]) as cam:
        theirs = cam(input_tensor=images, targets=None)
    for b in np.flatnonzero(agree.numpy()):
        _close(ours[b], theirs[b], f"eigencam image {b}")
    embedder, proxies = _proxies(net, images)  # no score: the same maps for an embedding net at the same layer
    torch.testing.assert_close(
        EmbeddingCAM(embedder, "net.features", method="eigencam")(images, proxies), torch.from_numpy(ours)
    )


def test_ablation_of_a_layer_with_negative_activations_matches_pytorch_grad_cam(net, images):
    """Below a BatchNorm (no ReLU) the minimum is not 0: both ablate to minimum - 1e7 (one channel per forward,
    where pytorch-grad-cam's in-place loop does not deepen the value)."""
    layer = net.features[1]
    ours = GradCAM(net, layer, method="ablationcam", channel_batch_size=1)(images, torch.tensor(TARGETS)).numpy()
    with pgc.AblationCAM(model=net, target_layers=[layer], batch_size=1) as cam:
        theirs = cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in TARGETS])
    _close(ours, theirs, "ablationcam below a BatchNorm")


@pytest.mark.parametrize("method", ["ablationcam", "eigencam"])
def test_head_only_equals_the_hooked_call_and_chunks_do_not_matter(net, images, method):
    targets = torch.tensor(TARGETS)
    raw = {"upsample": False, "normalize": False}
    with torch.no_grad():
        features = net.forward_features(images)
    hooked = GradCAM(net, "features", method=method)(images, targets, **raw)
    head = GradCAM(net.forward_head, None, method=method, channel_batch_size=5)(features, targets, **raw)
    torch.testing.assert_close(head, hooked, atol=1e-5, rtol=1e-4)
    explainer = HeadExplainer(AsModule(net))
    target = make_target("classifier")
    step = explain(explainer, features, net.forward_head(features).detach(), target, None, targets, method=method)
    torch.testing.assert_close(step.maps, hooked, atol=1e-5, rtol=1e-4)


def test_scorecam_of_a_cam_module_runs_the_whole_module_on_the_images(net, images):
    targets, module, target = torch.tensor(TARGETS), AsModule(net), make_target("classifier")
    head = HeadExplainer(module)
    features, outputs = head.features_and_outputs(images)
    with pytest.raises(ValueError, match="scorecam masks the input images.*explainer_for"):
        explain(head, features, outputs, target, None, targets, method="scorecam")
    explainer = explainer_for(module, "scorecam")
    features, outputs = explainer.features_and_outputs(images)
    step = explain(explainer, features, outputs, target, None, targets, method="scorecam")
    expected = GradCAM(net, "features", method="scorecam")(images, targets, upsample=False, normalize=False)
    torch.testing.assert_close(step.maps, expected)
    assert isinstance(explainer_for(module, "ablationcam"), HeadExplainer)
    with pytest.raises(ValueError, match="scorecam masks the input images"):
        CAM(net.forward_head, None, method="scorecam")


def test_ablation_through_a_reshape_finds_each_channel_in_the_layers_layout(net, images):
    """A channels-last layer and its reshape: the same maps as the channels-first one."""

    class Nhwc(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.layer = nn.Identity()

        def forward(self, x):
            f = self.layer(self.net.forward_features(x).permute(0, 2, 3, 1))
            return self.net.forward_head(f.permute(0, 3, 1, 2))

    targets = torch.tensor(TARGETS)
    to_grid = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731
    ours = GradCAM(Nhwc(), "layer", method="ablationcam", reshape=to_grid)(images, targets)
    torch.testing.assert_close(ours, GradCAM(net, "features", method="ablationcam")(images, targets))
    with pytest.raises(ValueError, match="must only rearrange"):
        GradCAM(Nhwc(), "layer", method="ablationcam", reshape=lambda t: to_grid(t) * 2)(images, targets)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "eigencam"])
def test_no_grad_written_flags_and_rng_untouched_hooks_removed(images, method):
    torch.manual_seed(0)
    net = SmallNet(dropout=0.5).train()
    net.stem.eval()
    flags = [m.training for m in net.modules()]
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    GradCAM(net, "features", method=method, channel_batch_size=7)(images)
    assert [m.training for m in net.modules()] == flags
    assert all(torch.equal(v, stats[k]) for k, v in net.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in net.parameters())
    assert all(not m._forward_hooks for m in net.modules())


@pytest.mark.parametrize(("method", "size"), [("ablationcam", 8), ("scorecam", 24)])
def test_explainers_forward_channel_batch_size_pairs_at_a_time(net, images, method, size):
    """explainer_for(..., channel_batch_size=n) hands n to the engine: B * K (image, channel) pairs take
    ceil(B * K / n) forwards (of the head for AblationCAM, of the whole module for ScoreCAM), plus the unmasked one."""
    module = AsModule(net)
    calls: list[int] = []
    counted = module.net.forward_head if method == "ablationcam" else module.net.forward
    with pytest.MonkeyPatch.context() as patch:
        name = "forward_head" if method == "ablationcam" else "forward"
        patch.setattr(module.net, name, lambda x: (calls.append(len(x)), counted(x))[1])
        explainer = explainer_for(module, method, channel_batch_size=size)
        features, outputs = explainer.features_and_outputs(images)
        calls.clear()
        explain(explainer, features, outputs, make_target("classifier"), None, torch.tensor(TARGETS), method=method)
    pairs = len(images) * 16  # SmallNet's CAM layer has 16 channels
    assert max(calls) == size and sum(calls) - pairs in (0, len(images)), calls
    assert len(calls) - (sum(calls) > pairs) == -(-pairs // size), calls
