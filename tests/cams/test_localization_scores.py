"""Heatmap ratio and pointing game by hand, and the localization metrics' inputs: torch and NumPy alike,
normalised first, bad ones named, non-finite maps counted, boxes clipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cubcam.cams.localization import (
    box_hits,
    boxes_from_map,
    heatmap_ratio,
    max_box_acc,
    pointing_game,
)


def test_heatmap_ratio_by_hand():
    cam = np.zeros((3, 6, 6))
    cam[0, 1, 1], cam[0, 1, 2], cam[0, 5, 5] = 2.0, 1.0, 1.0  # 3 of 4 inside
    cam[1, 2, 2] = 1.0  # a box edge through the middle of the only pixel: half of it
    gts = np.array([[0.0, 0.0, 4.0, 4.0], [2.5, 0.0, 3.0, 6.0], [0.0, 0.0, 6.0, 6.0]])  # map 2 is all zeros
    np.testing.assert_allclose(heatmap_ratio(cam, gts), [0.75, 0.5, 0.0])


def test_heatmap_ratio_of_a_uniform_map_is_the_box_area_share():
    cam = torch.ones(1, 10, 20)
    np.testing.assert_allclose(heatmap_ratio(cam, torch.tensor([[-5.0, 2.5, 10.0, 4.0]])), [5 * 4 / 200])  # clipped


def test_heatmap_ratio_rejects_negative_maps():
    with pytest.raises(ValueError, match="non-negative"):
        heatmap_ratio(-np.ones((1, 4, 4)), np.zeros((1, 4)))


def test_pointing_game_with_boxes():
    cam = np.zeros((5, 10, 10))
    cam[0, 3, 4] = 1.0  # centre (4.5, 3.5): inside
    cam[1, 8, 8] = 1.0  # outside
    cam[2, 3, 4] = cam[2, 8, 8] = 1.0  # a tie across the edge: not every maximum is inside
    cam[3, 2, 2] = cam[3, 5, 5] = 1.0  # a tie inside
    cam[4] = 0.3  # flat: points nowhere, even though the box covers the whole map
    gts = np.tile([2.0, 2.0, 4.0, 4.0], (5, 1))
    gts[4] = [0.0, 0.0, 10.0, 10.0]
    np.testing.assert_array_equal(pointing_game(cam, boxes=gts), [1.0, 0.0, 0.0, 1.0, 0.0])


def test_pointing_game_box_edge_is_inside():
    cam = np.zeros((2, 6, 6))
    cam[:, 2, 3] = 1.0  # centre (3.5, 2.5)
    gts = np.array([[3.5, 2.5, 1.0, 1.0], [3.6, 2.5, 1.0, 1.0]])
    np.testing.assert_array_equal(pointing_game(cam, boxes=gts), [1.0, 0.0])


def test_pointing_game_peak_is_not_decided_by_rounding():
    """Two pixels a float32 rounding apart are both the peak (one outside the box: a miss, as for an exact tie);
    one 1e-3 of the range below is not."""
    cam = np.zeros((3, 8, 8), dtype=np.float32)
    cam[:, 1, 1] = 1.0
    cam[0, 6, 6] = 1.0  # an exact tie outside the box
    cam[1, 6, 6] = np.nextafter(np.float32(1.0), np.float32(0.0))  # the same tie after a rounding
    cam[2, 6, 6] = 0.999  # a lower second peak
    gts = np.tile([[0.0, 0.0, 3.0, 3.0]], (3, 1))
    np.testing.assert_array_equal(pointing_game(cam, boxes=gts), [0.0, 0.0, 1.0])


def test_pointing_game_with_parts():
    cam = np.zeros((4, 64, 64))
    cam[:, 20, 30] = 1.0  # the maximum's centre is (30.5, 20.5)
    parts = np.zeros((4, 15, 3))
    parts[0, 3] = [30.5 + 9.0, 20.5 + 12.0, 1]  # 15 px away exactly: a hit
    parts[1, 3] = [30.5 + 9.0, 20.5 + 12.1, 1]  # just outside the radius
    parts[1, 4] = [30.5, 20.5, 0]  # the part on the maximum is invisible
    parts[2, 5], parts[2, 9] = [0.0, 0.0, 1], [31.0, 21.0, 1]  # the nearest visible part counts
    # image 3: no visible part, nothing to point at
    result = pointing_game(cam, parts=parts)
    np.testing.assert_array_equal(result[:3], [1.0, 0.0, 1.0])
    assert np.isnan(result[3])
    np.testing.assert_array_equal(pointing_game(cam, parts=parts, radius=16.0)[:2], [1.0, 1.0])


def test_pointing_game_flat_map_misses_parts():
    parts = np.zeros((1, 15, 3))
    parts[0, 0] = [2.0, 2.0, 1]
    np.testing.assert_array_equal(pointing_game(np.zeros((1, 4, 4)), parts=parts, radius=100.0), [0.0])


def test_pointing_game_needs_exactly_one_target():
    with pytest.raises(ValueError, match="exactly one"):
        pointing_game(np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="exactly one"):
        pointing_game(np.zeros((1, 4, 4)), boxes=np.zeros((1, 4)), parts=np.zeros((1, 15, 3)))


def test_torch_and_numpy_inputs_agree():
    g = torch.Generator().manual_seed(5)
    cams = F.interpolate(torch.rand(4, 1, 6, 6, generator=g), size=(40, 40), mode="bilinear")[:, 0]
    gts = torch.tensor([[5.0, 5.0, 20.0, 20.0], [0.0, 10.0, 40.0, 12.5], [22.0, 1.0, 15.0, 30.0], [8.0, 8.0, 3.0, 3.0]])
    parts = torch.cat([torch.rand(4, 15, 2, generator=g) * 40, torch.ones(4, 15, 1)], 2)
    np.testing.assert_array_equal(box_hits(cams, gts), box_hits(cams.numpy(), gts.numpy()))
    np.testing.assert_array_equal(heatmap_ratio(cams, gts), heatmap_ratio(cams.numpy(), gts.numpy()))
    np.testing.assert_array_equal(pointing_game(cams, boxes=gts), pointing_game(cams.numpy(), boxes=gts.numpy()))
    np.testing.assert_array_equal(pointing_game(cams, parts=parts), pointing_game(cams.numpy(), parts=parts.numpy()))
    np.testing.assert_array_equal(boxes_from_map(cams[0], 0.3), boxes_from_map(cams[0].numpy(), 0.3))
    ours, theirs = max_box_acc(cams, gts), max_box_acc(cams.numpy(), gts.numpy())
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_maps_are_min_max_normalised_first():
    rng = np.random.default_rng(6)
    cams = rng.random((3, 24, 24))
    gts = np.tile([4.0, 4.0, 10.0, 10.0], (3, 1))
    np.testing.assert_array_equal(box_hits(cams, gts), box_hits(5.0 * cams - 2.0, gts))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: box_hits(np.zeros((4, 4)), np.zeros((1, 4))), r"cams must be \[N, H, W\]"),
        (lambda: box_hits(np.full((1, 4, 4), np.nan), np.zeros((1, 4))), "NaN"),
        (lambda: box_hits(np.zeros((2, 4, 4)), np.zeros((1, 4))), "one per map"),
        (lambda: box_hits(np.zeros((1, 4, 4)), [[0.0, 0.0, -1.0, 2.0]]), "w, h >= 0"),
        (lambda: box_hits(np.zeros((1, 4, 4)), np.zeros((1, 4)), thresholds=[1.5]), "thresholds must be"),
        (lambda: box_hits(np.zeros((1, 4, 4)), np.zeros((1, 4)), iou_thresholds=[0.0]), "iou_thresholds must be"),
        (lambda: box_hits(np.zeros((1, 4, 4)), np.zeros((1, 4)), workers=0), "workers must be a positive integer"),
        (lambda: boxes_from_map(np.zeros((1, 4, 4)), 0.5), r"one map \[H, W\]"),
        (lambda: pointing_game(np.zeros((1, 4, 4)), parts=np.zeros((1, 15))), r"parts must be"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_non_finite_map_makes_every_score_nan_and_is_counted() -> None:
    from cubcam.cams.localization import LocalizationAccumulator

    maps = np.zeros((3, 8, 8))
    maps[:, 2:5, 2:5] = 1.0
    boxes = np.array([[2.0, 2.0, 3.0, 3.0]] * 3)
    accumulator = LocalizationAccumulator(3)
    accumulator.update([0, 1], maps[:2], boxes[:2])
    assert accumulator.compute()["max_box_acc"] == 1.0
    maps[2, 0, 0] = np.nan
    accumulator.update([2], maps[2:], boxes[2:])
    scores = accumulator.compute()
    assert scores["non_finite_images"] == 1 and scores["num_images"] == 3
    for key in ("max_box_acc", "box_acc_iou50", "heatmap_ratio", "pointing_game", "best_threshold_iou50"):
        assert np.isnan(scores[key]), key


def test_boxes_are_clipped_to_their_image_and_unscoreable_ones_flagged() -> None:
    from cubcam.cams.localization import check_boxes

    boxes = torch.tensor(
        [[2.0, 3, 10, 10], [-2, 5, 10, 20], [0, 0, float("nan"), 4], [1, 1, -4, 4], [1, 1, 0, 4], [40, 40, 5, 5]]
    )
    sizes = torch.tensor([[32.0, 16]] * 6)
    clipped, valid, was_clipped = check_boxes(boxes, sizes)
    assert valid.tolist() == [True, True, False, False, False, False]  # NaN, negative, empty, wholly outside
    assert was_clipped.tolist() == [False, True, False, False, False, False]
    assert clipped[:2].tolist() == [[2, 3, 10, 10], [0, 5, 8, 11]]
