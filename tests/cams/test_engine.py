"""The CAM engine against the formula, against Captum and pytorch-grad-cam, EmbeddingCAM's proxies, model
outputs and layers, and pytorch-grad-cam's habits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nets import Penultimate, corr, trained_looking
from torch import nn

from cubcam.cams import EmbeddingCAM, GradCAM, minmax_normalize, normalized_mean_proxies, single_point_proxy


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
    model = trained_looking(torchvision.models.resnet18(num_classes=10))
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
    assert corr(ours, theirs) > 0.999


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
    assert corr(ours, theirs) > 0.999


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


def test_clear_errors_for_bad_layers(net, images):
    with pytest.raises(AttributeError):
        GradCAM(net, "layer9")
    with pytest.raises(RuntimeError, match="did not run"):
        GradCAM(net, nn.Conv2d(3, 3, 1))(images)
    with pytest.raises(TypeError, match=r"\[B, K, h, w\]"):
        GradCAM(net, "fc")(images)


def test_a_pooled_layer_is_refused_by_name_not_explained_into_noise() -> None:
    """A 1x1 grid upsamples to a constant, which the min-max stretch made {0, 0.5, 1} noise."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=4).eval()
    with pytest.raises(ValueError, match=r"target layer avgpool gives a 1x1 grid \(2, 512, 1, 1\)"):
        GradCAM(model, "avgpool")(torch.randn(2, 3, 64, 64))


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
    assert np.abs(ours - theirs).max() < 1e-2 and corr(ours, theirs) > 0.999
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
