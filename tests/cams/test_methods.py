"""The CAM methods: one registry (cubcam.cams.methods) that the Literal, the CLI, the callback and the docs
follow; every gradient method against pytorch-grad-cam and its formula, for classes and proxies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nets import Penultimate, corr
from torch import nn

from cubcam.cams import EmbeddingCAM, GradCAM, normalized_mean_proxies
from cubcam.cams.methods import METHODS, methods_needing


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"])
def test_head_only_mode_equals_the_hooked_call(net, images, method):
    """target_layer=None explains activations a caller already has (e.g. from a validation step)."""
    targets = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        features = net.forward_features(images)
    head_only = GradCAM(net.forward_head, None, method=method)(features, targets, upsample=False, normalize=False)
    hooked = GradCAM(net, "features", method=method)(images, targets, upsample=False, normalize=False)
    torch.testing.assert_close(head_only, hooked)


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
    assert corr(ours, theirs) > 0.999, method

    embedder = Penultimate(net)
    with torch.no_grad():
        embeddings = embedder(images)
    proxies = normalized_mean_proxies(embeddings, torch.tensor([0, 1, 0, 1]))[torch.tensor([1, 0, 0, 1])]
    ours = EmbeddingCAM(embedder, "net.features", method=method)(images, proxies).numpy()
    with _pgc_class(method)(model=embedder, target_layers=[net.features]) as cam:
        theirs = cam(input_tensor=images, targets=[lambda output, p=p: output @ p for p in proxies])
    assert np.abs(ours - theirs).max() < 1e-2, method
    assert corr(ours, theirs) > 0.999, method


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
    from cubcam.cams.methods import gradient_map, weighted_activations

    torch.testing.assert_close(weighted_activations(a, g, "gradcam"), g.mean((2, 3), keepdim=True) * a)
    torch.testing.assert_close(weighted_activations(a, g, "hirescam"), g * a)
    torch.testing.assert_close(weighted_activations(a, g, "layercam"), torch.relu(g) * a)
    xw = (g * a).sum((2, 3), keepdim=True) / (a.sum((2, 3), keepdim=True) + 1e-7)
    torch.testing.assert_close(weighted_activations(a, g, "xgradcam"), xw * a)
    maps = [gradient_map(weighted_activations(a, g, w)) for w in GRADIENT_METHODS]
    assert all(not torch.allclose(maps[i], maps[j]) for i in range(5) for j in range(i + 1, 5))
    with pytest.raises(ValueError, match="CAM method must be one of"):
        GradCAM(nn.Linear(2, 2), None, method="gradcam--")


def test_the_docs_method_table_is_the_registry() -> None:
    """The docs' table of methods (docs/methods.md) is the registry's: a method added there and not here fails."""
    from pathlib import Path

    from cubcam.cams.methods import methods_table

    page = Path(__file__).resolve().parents[2] / "docs" / "methods.md"
    assert methods_table() in page.read_text()
