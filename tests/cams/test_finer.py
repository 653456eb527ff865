"""Finer-CAM (Zhang et al., CVPR 2025): against pytorch-grad-cam's FinerCAM for every gradient method, its formula,
its embedding-net form (one-hot proxies on logits give the classifier's), and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nets import Penultimate, corr
from test_methods import GRADIENT_METHODS, _pgc_class

from cubcam.cams import FinerCAM, normalized_mean_proxies
from cubcam.cams.targets import ClassLogits, Finer, Proxies, finer_rows


def agree(ours: torch.Tensor, theirs: np.ndarray, what: str) -> None:
    ours_np = ours.numpy()
    assert np.abs(ours_np - theirs).max() < 1e-2, what
    assert corr(ours_np, theirs) > 0.999, what


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_finer_cam_matches_pytorch_grad_cam_for_every_gradient_method(net, images, method):
    """The predicted class against its three nearest rivals, alpha 1, as pytorch-grad-cam's defaults."""
    import pytorch_grad_cam as pgc

    ours = FinerCAM(net, net.features, method=method)(images)
    with pgc.FinerCAM(net, [net.features], base_method=_pgc_class(method)) as cam:
        theirs = cam(images)
    agree(ours, theirs, method)


def test_explicit_classes_rivals_and_alpha_match_pytorch_grad_cam(net, images):
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget

    classes, rivals = [4, 0, 2, 1], [[1], [3], [0], [2]]
    ours = FinerCAM(net, "features")(images, torch.tensor(classes), rivals=torch.tensor(rivals), alpha=0.6)
    with pgc.FinerCAM(net, [net.features]) as cam:
        theirs = cam(images, targets=[FinerWeightedTarget(c, r, 0.6) for c, r in zip(classes, rivals)])
    agree(ours, theirs, "explicit")


def test_an_embedding_net_against_its_nearest_proxies_matches_pytorch_grad_cam_on_the_similarities(net, images):
    """FinerCAM(net, layer)(images, proxies=P) is pytorch-grad-cam's FinerCAM of the model ``x -> <y(x), P>``:
    each image's nearest proxy against the proxies nearest it."""
    import pytorch_grad_cam as pgc

    embedder = Penultimate(net)
    with torch.no_grad():
        embeddings = embedder(torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
    proxies = normalized_mean_proxies(embeddings, torch.arange(20) % 5)
    ours = FinerCAM(embedder, "net.features")(images, proxies=proxies, temperature=1.0)
    similarities = torch.nn.Sequential(embedder, torch.nn.Linear(16, 5, bias=False))
    similarities[1].weight.data = proxies.clone()
    with pgc.FinerCAM(similarities, [net.features]) as cam:
        theirs = cam(images)
    agree(ours, theirs, "embedding")


@pytest.mark.parametrize("method", [*GRADIENT_METHODS, "scorecam", "ablationcam"])
def test_one_hot_proxies_on_logits_give_the_classifier_s_finer_cam(net, images, method):
    raw = {"upsample": False, "normalize": False}
    cam = FinerCAM(net, "features", method=method, channel_batch_size=8)
    torch.testing.assert_close(
        cam(images, proxies=torch.eye(5), temperature=1.0, **raw), cam(images, **raw), atol=1e-5, rtol=1e-5
    )


def test_the_score_is_the_weighted_difference_and_the_rivals_the_nearest_scores():
    logits = torch.tensor([[3.0, 2.5, -1.0, 2.9, 0.0], [0.0, 1.0, 0.9, -2.0, 1.2]], requires_grad=True)
    rows = finer_rows(logits.detach(), torch.tensor([0, 1]), rivals=2)
    assert rows.tolist() == [[0, 3, 1], [1, 2, 4]]  # |s_k - s_c| ranks 1 and 2
    score = Finer(ClassLogits(), alpha=0.5).score(logits, rows)
    s, p = logits.tolist(), logits.softmax(1).tolist()
    expected = [
        sum(p[b][k] * (s[b][c] - 0.5 * s[b][k]) for k in rivals) / (sum(p[b][k] for k in rivals) + 1e-9)
        for b, (c, *rivals) in enumerate(rows.tolist())
    ]
    torch.testing.assert_close(score, torch.tensor(expected))
    assert finer_rows(logits.detach()[:, :3], torch.tensor([0, 1]), rivals=3).shape == (2, 3)  # clamped to 2 rivals
    # An embedding net's similarities are <y, p_k>; at temperature 1 with one-hot proxies, the logits'.
    torch.testing.assert_close(
        Finer(Proxies(torch.eye(5))).score(logits, rows), Finer(ClassLogits()).score(logits, rows)
    )
    hotter = Finer(Proxies(torch.eye(5)), temperature=2.0).score(logits, rows)
    assert not torch.allclose(hotter, Finer(ClassLogits()).score(logits, rows))


def test_what_has_no_rival_is_refused_by_name(net, images):
    binary = torch.nn.Sequential(net, torch.nn.Linear(5, 1))
    with pytest.raises(ValueError, match="a binary head's single logit has no rival"):
        FinerCAM(binary, "0.features")(images)
    with pytest.raises(ValueError, match="eigencam does not use the score"):
        FinerCAM(net, "features", method="eigencam")
    with pytest.raises(ValueError, match="at least one rival"):
        FinerCAM(net, "features")(images, rivals=0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        FinerCAM(net, "features")(images, rivals=torch.tensor([7]))
