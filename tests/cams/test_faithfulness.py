"""cams.faithfulness against closed forms and against pytorch-grad-cam's confidence-change metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

from cubcam.cams import ClassLogits, Proxies
from cubcam.cams.faithfulness import (
    CurveEnds,
    FaithfulnessAccumulator,
    auc,
    blur,
    confidence_change,
    deletion_insertion,
    pixel_ranks,
    random_maps,
)

# A 4x4 one-channel "image" of ones whose score is the weighted share of the pixels still present: removing pixel p
# takes w_p / sum(w) off it, so the deletion curve after the k most important pixels is 1 - S_k / S (S_k: the sum
# of the k largest weights), and insertion onto an empty canvas S_k / S.
WEIGHTS = torch.tensor([9.0, 1, 4, 3, 7, 2, 8, 6, 5, 10, 16, 11, 15, 12, 14, 13]).view(1, 1, 4, 4)


def linear_score(images: torch.Tensor) -> torch.Tensor:
    return (images * WEIGHTS).flatten(1).sum(1) / WEIGHTS.sum()


def ends(images: torch.Tensor, canvas: torch.Tensor) -> CurveEnds:
    return CurveEnds(linear_score(images), linear_score(torch.zeros_like(images)), linear_score(canvas))


@pytest.mark.parametrize("steps", [16, 4, 2])
def test_deletion_and_insertion_follow_the_closed_form(steps: int) -> None:
    images, canvas = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    maps = WEIGHTS[:, 0]  # the map ranks the pixels exactly by what they add to the score
    deletion, insertion = deletion_insertion(linear_score, images, maps, steps, ends(images, canvas), canvas)
    top = torch.sort(WEIGHTS.flatten(), descending=True).values.double()
    share = torch.cat([torch.zeros(1, dtype=torch.float64), top.cumsum(0)])[:: 16 // steps] / top.sum()
    assert torch.allclose(deletion[0], 1 - share) and torch.allclose(insertion[0], share)
    # trapezoids by hand: with one pixel a step (steps = 16) the insertion area is (sum_k S_k / S - 1 / 2) / 16
    assert auc(insertion).item() == pytest.approx(float((share[1:] + share[:-1]).sum() / (2 * steps)))
    assert auc(deletion).item() == pytest.approx(1 - auc(insertion).item())


def test_a_reversed_map_deletes_worse_and_a_random_one_in_between() -> None:
    images, canvas = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    areas = {}
    for name, maps in {"right": WEIGHTS[:, 0], "reversed": -WEIGHTS[:, 0], "flat": torch.zeros(1, 4, 4)}.items():
        deletion, insertion = deletion_insertion(linear_score, images, maps, 16, ends(images, canvas), canvas)
        areas[name] = (auc(deletion).item(), auc(insertion).item())
    assert areas["right"][0] < areas["flat"][0] < areas["reversed"][0]
    assert areas["right"][1] > areas["flat"][1] > areas["reversed"][1]


def test_pixel_ranks_put_the_highest_first_and_break_ties_by_position() -> None:
    maps = torch.tensor([[[0.5, 0.9], [0.5, 0.1]]])
    assert pixel_ranks(maps).tolist() == [[1, 0, 2, 3]]


def test_confidence_change_is_chattopadhyays() -> None:
    images = torch.ones(2, 1, 4, 4)
    maps = torch.stack([WEIGHTS[0, 0] / WEIGHTS.max(), torch.ones(4, 4)])
    base = torch.tensor([1.0, 0.5])  # the second image's "true" score is below what it keeps: an increase
    drop, increase = confidence_change(linear_score, images, maps, base)
    kept = float((WEIGHTS**2).sum() / (WEIGHTS.max() * WEIGHTS.sum()))  # sum(w * w / max w) / sum(w)
    assert drop.tolist() == pytest.approx([1 - kept, 0.0]) and increase.tolist() == [False, True]
    zero_drop, _ = confidence_change(linear_score, images[:1], maps[:1], torch.zeros(1))
    assert zero_drop.item() == 0.0  # nothing to lose: no division by zero


def test_confidence_change_equals_pytorch_grad_cams_on_a_cnn() -> None:
    """pytorch-grad-cam's DropInConfidence is max(0, Y - O) (Chattopadhyay's numerator) and IncreaseInConfidence
    O > Y, on the softmax of the class and the image multiplied by its map, as here."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    images = torch.randn(4, 3, 64, 64)
    maps = torch.rand(4, 64, 64)
    classes = torch.tensor([0, 1, 2, 3])
    target = ClassLogits()
    with torch.no_grad():
        base = target.confidence(model(images), classes)
        drop, increase = confidence_change(lambda x: target.confidence(model(x), classes), images, maps, base)
    pgc_targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    pgc_drop = DropInConfidence()(images, maps.numpy(), pgc_targets, model)
    pgc_increase = IncreaseInConfidence()(images, maps.numpy(), pgc_targets, model)
    np.testing.assert_allclose((drop * base).numpy(), pgc_drop, atol=1e-6)
    assert increase.numpy().tolist() == pgc_increase.astype(bool).tolist()


def test_bounded_scores_of_both_targets() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    assert ClassLogits().confidence(logits, torch.tensor([0, 2])).tolist() == pytest.approx(
        [logits[0].softmax(0)[0].item(), logits[1].softmax(0)[2].item()]
    )
    proxies = Proxies(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    embeddings = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    assert proxies.confidence(embeddings, torch.tensor([0, 1])).tolist() == pytest.approx([0.6, 0.0])  # clipped


def test_blur_keeps_flat_images_and_smooths_edges() -> None:
    flat = torch.full((1, 3, 32, 32), 0.7)
    assert torch.allclose(blur(flat), flat)
    edge = torch.zeros(1, 1, 32, 32)
    edge[..., 16:] = 1
    blurred = blur(edge, 0.1)
    assert 0 < blurred[0, 0, 0, 15] < 0.5 < blurred[0, 0, 0, 16] < 1
    assert blurred.mean().item() == pytest.approx(0.5, abs=1e-6)  # mass is kept


def test_random_maps_are_cam_like_and_reproducible() -> None:
    first = random_maps(3, (4, 4), (32, 32), torch.Generator().manual_seed(1))
    again = random_maps(3, (4, 4), (32, 32), torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and first.shape == (3, 32, 32)
    assert first.amin((1, 2)).tolist() == [0.0] * 3 and first.amax((1, 2)).tolist() == pytest.approx([1.0] * 3)
    assert (first[:, 1:] - first[:, :-1]).abs().max() < 0.35  # upsampled from a 4x4 grid: no pixel noise


def test_accumulator_means_over_batches_and_rejects_empty() -> None:
    accumulator = FaithfulnessAccumulator(steps=2)
    with pytest.raises(ValueError, match="no image"):
        accumulator.compute()
    curve = torch.tensor([[1.0, 0.5, 0.0]])
    accumulator.update(curve, 1 - curve, torch.tensor([0.2]), torch.tensor([True]))
    accumulator.update(curve * 0, curve * 0 + 1, torch.tensor([0.4]), torch.tensor([False]))
    scores = accumulator.compute()
    assert scores["deletion_auc"] == pytest.approx(0.25) and scores["insertion_auc"] == pytest.approx(0.75)
    assert scores["average_drop"] == pytest.approx(0.3) and scores["increase_in_confidence"] == 0.5
    assert scores["deletion_curve"] == pytest.approx([0.5, 0.25, 0.0]) and scores["num_images"] == 2
