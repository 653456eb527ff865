"""The CAM engine against the formula, against Captum and pytorch-grad-cam, and its safety guarantees."""

from __future__ import annotations

import resource

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cubcam.cams import EmbeddingCAM, GradCAM, minmax_normalize, normalized_mean_proxies, single_point_proxy
from cubcam.cams.methods import METHODS, methods_needing


class SmallNet(nn.Module):
    """conv-bn-relu ×2 → GAP → fc; ``features`` is the CAM layer, ``stem`` lies below it."""

    def __init__(self, num_classes: int = 5, dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.features = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(16, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.stem(x))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(f.mean((2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class Penultimate(nn.Module):
    """The same network without its fc layer: pooled features as an 'embedding'."""

    def __init__(self, net: SmallNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x).mean((2, 3))


def _trained_looking(net: nn.Module) -> nn.Module:
    """Give BatchNorm non-trivial running statistics so eval mode differs from train mode."""
    torch.manual_seed(1)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, 32, 32))
    return net.eval()


@pytest.fixture
def net() -> SmallNet:
    torch.manual_seed(0)
    return _trained_looking(SmallNet())


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# --- the formula -----------------------------------------------------------------------------------------------


def test_tiny_network_matches_hand_computed_formula():
    """y = sum_k W_ck * mean_ij(A_k^2): dy/dA_kij = 2 W_ck A_kij / (h w), so w_k = 2 W_ck mean(A_k) / (h w)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 1, bias=False)
    weight = torch.randn(4, 3)

    class Quadratic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return (self.conv(x) ** 2).mean((2, 3)) @ weight.T

    x = torch.randn(2, 2, 3, 5)
    targets = torch.tensor([1, 3])
    raw = GradCAM(Quadratic(), "conv")(x, targets, upsample=False, normalize=False)

    A = conv(x).detach()
    expected = torch.stack(
        [
            torch.relu(sum(2 * weight[t, k] * A[b, k].mean() / 15 * A[b, k] for k in range(3)))
            for b, t in enumerate(targets.tolist())
        ]
    )
    torch.testing.assert_close(raw, expected, atol=1e-6, rtol=1e-5)


def test_gap_linear_head_gives_classic_cam(net, images):
    """With GAP → fc after the layer, GradCAM equals CAM: ReLU(sum_k W_ck A_k) / (h w) (Zhou et al. 2016)."""
    targets = torch.tensor([0, 1, 2, 3])
    raw = GradCAM(net, net.features)(images, targets, upsample=False, normalize=False)
    with torch.no_grad():
        A = net.forward_features(images)
    expected = torch.relu(torch.einsum("bk,bkij->bij", net.fc.weight[targets], A)) / (A.shape[2] * A.shape[3])
    torch.testing.assert_close(raw, expected, atol=1e-6, rtol=1e-5)


def test_default_target_is_the_predicted_class(net, images):
    with torch.no_grad():
        predicted = net(images).argmax(1)
    gc = GradCAM(net, "features")
    torch.testing.assert_close(gc(images), gc(images, predicted))


def test_upsampling_is_bilinear_then_per_image_minmax(net, images):
    gc = GradCAM(net, "features")
    raw = gc(images, upsample=False, normalize=False)
    expected = minmax_normalize(F.interpolate(raw[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0])
    maps = gc(images)
    torch.testing.assert_close(maps, expected)
    assert maps.shape == (4, 32, 32)
    assert maps.amin((1, 2)).eq(0).all() and maps.amax((1, 2)).eq(1).all()


# --- peers -------------------------------------------------------------------------------------------------------


def test_matches_captum_layer_gradcam(net, images):
    from captum.attr import LayerGradCam

    targets = torch.tensor([4, 0, 2, 1])
    ours = GradCAM(net, net.features)(images, targets, upsample=False, normalize=False)
    theirs = LayerGradCam(net, net.features).attribute(images, target=targets, relu_attributions=True)[:, 0]
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-5, rtol=1e-5)


def test_matches_captum_on_resnet18():
    import torchvision
    from captum.attr import LayerGradCam

    torch.manual_seed(0)
    model = _trained_looking(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    targets = torch.tensor([3, 7])
    ours = GradCAM(model, "layer4")(x, targets, upsample=False, normalize=False)
    theirs = LayerGradCam(model, model.layer4).attribute(x, target=targets, relu_attributions=True)[:, 0]
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-5, rtol=1e-4)


def test_matches_pytorch_grad_cam(net, images):
    from pytorch_grad_cam import GradCAM as PGCGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [4, 0, 2, 1]
    ours = GradCAM(net, net.features)(images, torch.tensor(targets)).numpy()
    with PGCGradCAM(model=net, target_layers=[net.features]) as cam:
        theirs = cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in targets])
    assert np.abs(ours - theirs).max() < 1e-2
    assert _corr(ours, theirs) > 0.999


# --- EmbeddingCAM ------------------------------------------------------------------------------------------------


def test_embeddingcam_with_one_hot_proxies_on_logits_is_gradcam(net, images):
    targets = torch.tensor([1, 4, 0, 3])
    proxies = F.one_hot(targets, 5).float()
    for kwargs in ({}, {"upsample": False, "normalize": False}):
        torch.testing.assert_close(
            EmbeddingCAM(net, "features")(images, proxies, **kwargs),
            GradCAM(net, "features")(images, targets, **kwargs),
            atol=1e-5,
            rtol=1e-5,
        )


def test_embeddingcam_on_penultimate_features_with_fc_rows_is_gradcam(net, images):
    targets = torch.tensor([2, 2, 4, 0])
    embedder = Penultimate(net)
    raw_ec = EmbeddingCAM(embedder, "net.features")(
        images, net.fc.weight[targets].detach(), upsample=False, normalize=False
    )
    raw_gc = GradCAM(net, "features")(images, targets, upsample=False, normalize=False)
    torch.testing.assert_close(raw_ec, raw_gc, atol=1e-5, rtol=1e-5)


def test_embeddingcam_matches_pytorch_grad_cam_with_proxy_target(net, images):
    from pytorch_grad_cam import GradCAM as PGCGradCAM

    embedder = Penultimate(net)
    with torch.no_grad():
        embeddings = embedder(images)
    proxies = normalized_mean_proxies(embeddings, torch.tensor([0, 1, 0, 1]))[torch.tensor([1, 0, 0, 1])]

    class ProxyTarget:
        def __init__(self, proxy):
            self.proxy = proxy

        def __call__(self, output):
            return output @ self.proxy

    ours = EmbeddingCAM(embedder, "net.features")(images, proxies).numpy()
    with PGCGradCAM(model=embedder, target_layers=[net.features]) as cam:
        theirs = cam(input_tensor=images, targets=[ProxyTarget(p) for p in proxies])
    assert np.abs(ours - theirs).max() < 1e-2
    assert _corr(ours, theirs) > 0.999


def test_single_proxy_for_the_whole_batch(net, images):
    p = single_point_proxy(torch.randn(5))
    ec = EmbeddingCAM(net, "features")
    torch.testing.assert_close(ec(images, p), ec(images, p.expand(4, 5)))
    with pytest.raises(ValueError, match="do not fit"):
        ec(images, torch.randn(3, 5))


def test_proxies_follow_their_definition():
    embeddings = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0], [5.0, 0.0]])
    labels = torch.tensor([0, 0, 2, 2])
    proxies = normalized_mean_proxies(embeddings, labels, num_classes=4)
    mean0 = torch.tensor([0.6, 0.8]) / 2 + torch.tensor([0.0, 1.0]) / 2
    torch.testing.assert_close(proxies[0], mean0 / mean0.norm())
    torch.testing.assert_close(proxies[2], torch.tensor([1.0, 0.0]))
    assert proxies[1].abs().sum() == 0 and proxies[3].abs().sum() == 0  # no members: zero, not NaN
    torch.testing.assert_close(single_point_proxy(torch.tensor([3.0, 4.0])), torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(single_point_proxy(embeddings[:2]).norm(dim=1), torch.ones(2))


# --- safety in training ------------------------------------------------------------------------------------------


def test_hooks_removed_even_when_the_call_raises(net, images):
    gc = GradCAM(net, "features")
    gc(images)
    with pytest.raises(ValueError, match="targets must lie"):
        gc(images, torch.tensor([0, 1, 2, 99]))
    for module in net.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks


def test_no_grad_written_and_nothing_below_the_layer_backpropagated(net, images):
    below: list[str] = []
    handle = net.stem.register_full_backward_hook(lambda *args: below.append("stem"))
    try:
        GradCAM(net, "features")(images)
        EmbeddingCAM(Penultimate(net), "net.features")(images, torch.randn(16))
    finally:
        handle.remove()
    assert below == []
    assert all(p.requires_grad and p.grad is None for p in net.parameters())


def test_flags_restored_and_batchnorm_statistics_unchanged(images):
    torch.manual_seed(0)
    net = SmallNet(dropout=0.5).train()
    net.stem.eval()  # a mixed state must come back exactly
    flags = [m.training for m in net.modules()]
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    GradCAM(net, "features")(images)
    assert [m.training for m in net.modules()] == flags
    for k, v in net.state_dict().items():
        assert torch.equal(v, stats[k]), k
    assert torch.equal(torch.get_rng_state(), rng)  # eval mode: dropout drew no random numbers


def test_batch_equals_one_by_one(net, images):
    gc = GradCAM(net, "features")
    batch = gc(images)
    single = torch.cat([gc(images[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(batch, single, atol=1e-6, rtol=1e-5)


def test_constant_input_and_flat_maps_give_zeros_not_nan(net):
    maps = GradCAM(net, "features")(torch.zeros(2, 3, 32, 32))
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    flat = minmax_normalize(torch.full((2, 4, 4), 3.0))
    assert torch.equal(flat, torch.zeros(2, 4, 4))

    class Blind(nn.Module):  # the score ignores the map entirely except through a constant: w = 0
        def __init__(self):
            super().__init__()
            self.layer = nn.Identity()

        def forward(self, x):
            return (self.layer(x) * 0).mean((2, 3))

    maps = GradCAM(Blind(), "layer")(torch.randn(2, 3, 8, 8))
    assert torch.equal(maps, torch.zeros(2, 8, 8))


def test_works_under_no_grad_and_refuses_inference_mode(net, images):
    gc = GradCAM(net, "features")
    expected = gc(images)
    with torch.no_grad():
        torch.testing.assert_close(gc(images), expected)
    assert torch.is_grad_enabled()
    with torch.inference_mode():
        inference_images = images.clone()
        with pytest.raises(RuntimeError, match=r"inference_mode\(False\)"):
            gc(inference_images)
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
        ):  # the documented way out, inference tensor input included
            torch.testing.assert_close(gc(inference_images), expected)


def test_memory_stays_flat_over_200_calls(net):
    gc = GradCAM(net, "features")
    x = torch.randn(8, 3, 64, 64)
    for _ in range(20):
        gc(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(200):
        gc(x)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 20 * 1024, f"peak RSS grew by {grown_kib} KiB over 200 calls"
    assert not net.features._forward_hooks


def test_autocast_matches_float32(net, images):
    gc = GradCAM(net, "features")
    expected = gc(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = gc(images)
    assert maps.dtype == torch.float32
    assert _corr(maps.numpy(), expected.numpy()) > 0.98


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_matches_cpu(net, images):
    expected = GradCAM(net, "features")(images)
    gpu = net.cuda()
    maps = GradCAM(gpu, "features")(images.cuda())
    assert maps.device.type == "cuda"
    torch.testing.assert_close(maps.cpu(), expected, atol=1e-4, rtol=1e-4)


# --- model outputs and layers ------------------------------------------------------------------------------------


def test_output_selector_for_tuple_and_dict_outputs(net, images):
    class Tupled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            f = self.net.forward_features(x)
            return {"logits": self.net.forward_head(f), "features": f}

    expected = GradCAM(net, "features")(images)
    model = Tupled()
    torch.testing.assert_close(GradCAM(model, "net.features", output="logits")(images), expected)
    torch.testing.assert_close(GradCAM(model, "net.features", output=lambda o: o["logits"])(images), expected)
    with pytest.raises(TypeError, match="output="):
        GradCAM(model, "net.features")(images)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"])
def test_head_only_mode_equals_the_hooked_call(net, images, method):
    """target_layer=None explains activations a caller already has (e.g. from a validation step)."""
    targets = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        features = net.forward_features(images)
    head_only = GradCAM(net.forward_head, None, method=method)(features, targets, upsample=False, normalize=False)
    hooked = GradCAM(net, "features", method=method)(images, targets, upsample=False, normalize=False)
    torch.testing.assert_close(head_only, hooked)


def test_clear_errors_for_bad_layers(net, images):
    with pytest.raises(AttributeError):
        GradCAM(net, "layer9")
    with pytest.raises(RuntimeError, match="did not run"):
        GradCAM(net, nn.Conv2d(3, 3, 1))(images)
    with pytest.raises(TypeError, match=r"\[B, K, h, w\]"):
        GradCAM(net, "fc")(images)


# --- the CAM family: every method, both score kinds ----------------------------------------------------------

GRADIENT_METHODS = methods_needing("gradients")


def _pgc_class(method: str):
    import pytorch_grad_cam as pgc

    return {
        "gradcam": pgc.GradCAM,
        "gradcam++": pgc.GradCAMPlusPlus,
        "hirescam": pgc.HiResCAM,
        "xgradcam": pgc.XGradCAM,
        "layercam": pgc.LayerCAM,
    }[method]


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_every_gradient_method_matches_pytorch_grad_cam_for_classes_and_proxies(net, images, method):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [4, 0, 2, 1]
    ours = GradCAM(net, net.features, method=method)(images, torch.tensor(targets)).numpy()
    with _pgc_class(method)(model=net, target_layers=[net.features]) as cam:
        theirs = cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in targets])
    assert np.abs(ours - theirs).max() < 1e-2, method
    assert _corr(ours, theirs) > 0.999, method

    embedder = Penultimate(net)
    with torch.no_grad():
        embeddings = embedder(images)
    proxies = normalized_mean_proxies(embeddings, torch.tensor([0, 1, 0, 1]))[torch.tensor([1, 0, 0, 1])]
    ours = EmbeddingCAM(embedder, "net.features", method=method)(images, proxies).numpy()
    with _pgc_class(method)(model=embedder, target_layers=[net.features]) as cam:
        theirs = cam(input_tensor=images, targets=[lambda output, p=p: output @ p for p in proxies])
    assert np.abs(ours - theirs).max() < 1e-2, method
    assert _corr(ours, theirs) > 0.999, method


@pytest.mark.parametrize("method", list(METHODS))
def test_one_hot_proxies_on_logits_give_the_class_cam_for_every_method(net, images, method):
    targets = torch.tensor([1, 4, 0, 3])
    raw = {"upsample": False, "normalize": False}
    torch.testing.assert_close(
        EmbeddingCAM(net, "features", method=method)(images, F.one_hot(targets, 5).float(), **raw),
        GradCAM(net, "features", method=method)(images, targets, **raw),
        atol=1e-5,
        rtol=1e-5,
    )


def test_the_method_literal_is_the_registry_and_every_consumer_derives_from_it(capsys) -> None:
    """One list of methods: the Literal mypy checks equals the registry's names, and what the CLI offers and the
    callback refuses come from the registry's ``needs``."""
    from typing import get_args

    from cubcam.callbacks import CAMPanel
    from cubcam.cams.methods import Method
    from cubcam.train.inspection.explain import parse_args

    assert get_args(Method) == tuple(METHODS)
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "--method {" + ",".join(METHODS) + "}" in capsys.readouterr().out
    for name, spec in METHODS.items():
        if spec.needs == "image forwards":
            with pytest.raises(ValueError, match=f"'{name}' needs a forward of the whole model"):
                CAMPanel(method=name)
        else:
            CAMPanel(method=name)
    with pytest.raises(ValueError, match="'embeddingcam' is a model kind, not a CAM method.*kind='embedding'"):
        CAMPanel(method="embeddingcam")  # type: ignore[arg-type]


def test_gradient_methods_follow_their_formulas_and_differ():
    torch.manual_seed(0)
    a, g = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    from cubcam.cams.methods import weighted_activations

    hires = torch.relu((g * a).sum(1))
    torch.testing.assert_close(weighted_activations(a, g, "hirescam"), hires)
    torch.testing.assert_close(weighted_activations(a, g, "layercam"), torch.relu((torch.relu(g) * a).sum(1)))
    xw = (g * a).sum((2, 3), keepdim=True) / (a.sum((2, 3), keepdim=True) + 1e-7)
    torch.testing.assert_close(weighted_activations(a, g, "xgradcam"), torch.relu((xw * a).sum(1)))
    maps = [weighted_activations(a, g, w) for w in GRADIENT_METHODS]
    assert all(not torch.allclose(maps[i], maps[j]) for i in range(5) for j in range(i + 1, 5))
    with pytest.raises(ValueError, match="CAM method must be one of"):
        GradCAM(nn.Linear(2, 2), None, method="gradcam--")


def test_a_pooled_layer_is_refused_by_name_not_explained_into_noise() -> None:
    """A 1x1 grid upsamples to a constant, which the min-max stretch made {0, 0.5, 1} noise."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=4).eval()
    with pytest.raises(ValueError, match=r"target layer avgpool gives a 1x1 grid \(2, 512, 1, 1\)"):
        GradCAM(model, "avgpool")(torch.randn(2, 3, 64, 64))


def test_non_finite_maps_become_nan_before_the_stretch_and_flat_ones_zeros() -> None:
    maps = torch.stack([torch.rand(4, 4), torch.zeros(4, 4), torch.rand(4, 4)])
    maps[2, 1, 1] = float("nan")
    out = minmax_normalize(maps)
    assert out[0].min() == 0 and out[0].max() == 1
    assert (out[1] == 0).all()  # an empty (ReLU'd) map stays empty
    assert out[2].isnan().all()  # was: zeros, scored as misses


def test_a_single_logit_is_a_binary_classifier_as_in_pytorch_grad_cam(net, images):
    """Class 1 explains the logit, class 0 its negation (pytorch-grad-cam's BinaryClassifierOutputTarget); before,
    class 1 was refused ("targets must lie in [0, 1)")."""
    from pytorch_grad_cam import GradCAM as PGCGradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    net.fc = nn.Linear(net.fc.in_features, 1)
    targets = [1, 0, 1, 0]
    ours = GradCAM(net, net.features)(images, torch.tensor(targets)).numpy()
    with PGCGradCAM(model=net, target_layers=[net.features]) as cam:
        theirs = cam(input_tensor=images, targets=[BinaryClassifierOutputTarget(t) for t in targets])
    assert np.abs(ours - theirs).max() < 1e-2 and _corr(ours, theirs) > 0.999
    from cubcam.cams.targets import ClassLogits

    logit = torch.tensor([[2.0], [-1.0]])
    scores = ClassLogits().class_scores(logit)
    torch.testing.assert_close(scores[:, 1], logit[:, 0].sigmoid())
    torch.testing.assert_close(scores.sum(1), torch.ones(2))


def test_a_score_function_of_ones_own_drives_the_map(net, images):
    from cubcam.cams.engine import CAM
    from cubcam.cams.targets import ScoreOf, make_target

    def sigmoid_of_class(outputs, classes):  # multi-label heads explain a class's probability
        return outputs.gather(1, classes[:, None])[:, 0].sigmoid()

    classes = torch.tensor([1, 4, 0, 3])
    target = make_target("classifier", score=sigmoid_of_class).target
    assert isinstance(target, ScoreOf)
    ours = CAM(net, "features").explain(images, target, classes, upsample=False, normalize=False)
    # d sigmoid(z) = sigmoid'(z) dz: the same map as the logit's, scaled per image by sigmoid'(z) > 0 before ReLU.
    logits = net(images).detach().gather(1, classes[:, None])[:, 0]
    slope = logits.sigmoid() * (1 - logits.sigmoid())
    plain = GradCAM(net, "features")(images, classes, upsample=False, normalize=False)
    torch.testing.assert_close(ours, plain * slope[:, None, None], atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match=r"must return one score per image \[4\], got \(4, 5\)"):
        CAM(net, "features").explain(images, make_target("classifier", score=lambda o, c: o).target, classes)


def test_pytorch_grad_cam_habits_map_onto_the_engine_or_say_the_cubcam_way(net, images):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cubcam.cams import denormalize, overlay  # noqa: F401  (denormalize is exported)

    targets = [4, 0, 2, 1]
    ours = GradCAM(net, net.features)(images, torch.tensor(targets))
    habit = GradCAM(model=net, target_layers=[net.features])(
        input_tensor=images, targets=[ClassifierOutputTarget(t) for t in targets]
    )
    torch.testing.assert_close(habit, ours)
    torch.testing.assert_close(
        GradCAM(net, "features")(images, 2), GradCAM(net, "features")(images, torch.full((4,), 2))
    )
    with pytest.raises(ValueError, match="cubcam explains one layer"):
        GradCAM(net, target_layers=[net.features, net.fc])
    with pytest.raises(TypeError, match="pass target_layer"):
        GradCAM(net)
    with pytest.raises(TypeError, match="targets must be class indices"):
        GradCAM(net, "features")(images, [object()] * 4)
    # show_cam_on_image's convention: a float HWC image in [0, 1].
    rgb = np.random.default_rng(0).random((32, 32, 3))
    as_uint8 = (rgb * 255).round().astype(np.uint8)
    assert np.abs(overlay(rgb, ours[0]).astype(int) - overlay(as_uint8, ours[0]).astype(int)).max() <= 1


def test_the_docs_method_table_is_the_registry() -> None:
    """The docs' table of methods is generated from the registry; a method added there and not to the docs fails."""
    from pathlib import Path

    from cubcam.cams.methods import methods_table

    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert methods_table() in readme.read_text()
