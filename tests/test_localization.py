"""Localization metrics against hand-worked cases, a per-threshold scipy.ndimage reference and OpenCV's contours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from cubcam.cams.localization import (
    DEFAULT_IOU_THRESHOLDS,
    DEFAULT_THRESHOLDS,
    STACK_PIXELS,
    box_hits,
    box_iou,
    boxes_from_map,
    heatmap_ratio,
    max_box_acc,
    max_box_acc_from_hits,
    pointing_game,
)

# --- references ----------------------------------------------------------------------------------------------------


def reference_on_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    """wsolevaluation's binarisation: uint8(255 * map in [0, 1]) > int(threshold * its max)."""
    span = cam.max() - cam.min()
    q = ((cam - cam.min()) / span * 255).astype(np.uint8) if span > 0 else np.zeros(cam.shape, np.uint8)
    return q > int(threshold * q.max())


def naive_boxes(cam: np.ndarray, threshold: float) -> list[tuple[int, int, int, int]]:
    """Label this one threshold from scratch: 8-connected regions, plus holes (4-connected off regions away from the
    border) grown by the one-pixel contour around them. Sorted xywh tuples."""
    on = reference_on_mask(cam, threshold)
    h, w = on.shape
    boxes = [
        (s[1].start, s[0].start, s[1].stop - s[1].start, s[0].stop - s[0].start)
        for s in ndimage.find_objects(ndimage.label(on, np.ones((3, 3)))[0])
    ]
    for s in ndimage.find_objects(ndimage.label(~on)[0]):
        if s[0].start > 0 and s[1].start > 0 and s[0].stop < h and s[1].stop < w:
            boxes.append((s[1].start - 1, s[0].start - 1, s[1].stop - s[1].start + 2, s[0].stop - s[0].start + 2))
    return sorted(boxes)


def naive_hits(cam: np.ndarray, boxes: np.ndarray, thresholds=DEFAULT_THRESHOLDS, ious=DEFAULT_IOU_THRESHOLDS):
    """[G, T, I] for one map and G ground-truth boxes, IoU by hand."""
    out = np.zeros((len(boxes), len(thresholds), len(ious)), bool)
    for t, threshold in enumerate(thresholds):
        found = naive_boxes(cam, threshold)
        for g, gt in enumerate(boxes):
            best = max((iou_by_hand(b, gt) for b in found), default=0.0)
            out[g, t] = [best >= iou for iou in ious]
    return out


def iou_by_hand(a, b) -> float:
    ax0, ay0, ax1, ay1 = a[0], a[1], a[0] + a[2], a[1] + a[3]
    bx0, by0, bx1, by1 = b[0], b[1], b[0] + b[2], b[1] + b[3]
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def sorted_rows(boxes: np.ndarray) -> list[tuple[int, ...]]:
    return sorted(tuple(int(v) for v in row) for row in boxes)


def random_maps(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Noise (many tiny regions and holes), smoothed noise (blobs, rings), odd shapes and plateaus."""
    maps = []
    for i in range(count):
        h, w = rng.integers(1, 36, 2)
        noise = rng.random((h, w))
        kind = i % 4
        if kind == 1:
            noise = ndimage.gaussian_filter(noise, rng.uniform(0.7, 3.0))
        elif kind == 2:
            noise = np.round(noise * 4) / 4  # plateaus: many pixels exactly at a level
        elif kind == 3:
            noise = F.interpolate(torch.from_numpy(noise)[None, None], scale_factor=3, mode="bilinear")[0, 0].numpy()
        maps.append(noise)
    return maps


# --- hand-worked cases ---------------------------------------------------------------------------------------------


def test_box_exactly_covered_gives_accuracy_one():
    cam = np.zeros((1, 32, 32))
    cam[0, 4:10, 8:18] = 1.0  # rows 4..9, columns 8..17: the box (8, 4, 10, 6)
    gt = np.array([[8.0, 4.0, 10.0, 6.0]])
    np.testing.assert_array_equal(boxes_from_map(cam[0], 0.5), [[8, 4, 10, 6]])
    scores = max_box_acc(cam, gt)
    assert scores["max_box_acc"] == 1.0
    assert scores["box_acc_iou30"] == scores["box_acc_iou50"] == scores["box_acc_iou70"] == 1.0
    assert scores["best_threshold_iou50"] == 0.0  # the lowest threshold that achieves it
    assert box_hits(cam, gt).all()  # every threshold below 1 gives the same region


@pytest.mark.parametrize("value", [0.0, 0.7])
def test_flat_map_has_no_region_and_no_hit(value):
    cam = np.full((1, 16, 16), value)
    assert boxes_from_map(cam[0], 0.0).shape == (0, 4)
    gt = np.array([[0.0, 0.0, 16.0, 16.0]])  # even a box covering the whole image
    assert not box_hits(cam, gt).any()
    assert max_box_acc(cam, gt)["max_box_acc"] == 0.0


def test_any_region_may_match_not_only_the_largest():
    cam = np.zeros((1, 40, 40))
    cam[0, 2:22, 2:22] = 1.0  # the large region, far from the object
    cam[0, 30:36, 28:38] = 0.8  # the second region is the object
    gt = np.array([[28.0, 30.0, 10.0, 6.0]])
    assert sorted_rows(boxes_from_map(cam[0], 0.5)) == [(2, 2, 20, 20), (28, 30, 10, 6)]
    hits = box_hits(cam, gt)[0]
    assert hits[DEFAULT_THRESHOLDS < 0.79].all()  # both regions are on: the second one matches
    assert not hits[DEFAULT_THRESHOLDS >= 0.8].any()  # only the first one is left
    assert max_box_acc(cam, gt)["max_box_acc"] == 1.0


def test_hole_gives_the_box_of_its_contour():
    cam = np.zeros((16, 16))
    cam[2:11, 2:11] = 1.0  # 9 x 9 square ...
    cam[4:9, 4:9] = 0.0  # ... with a 5 x 5 hole: its contour runs through the on pixels around it
    assert sorted_rows(boxes_from_map(cam, 0.5)) == [(2, 2, 9, 9), (3, 3, 7, 7)]


def test_threshold_is_strict_on_the_8bit_map():
    cam = np.zeros((8, 8))
    cam[1, 1], cam[5, 5] = 1.0, 0.5  # uint8: 255 and 127
    # at 0.5 the cut is int(0.5 * 255) = 127: the 0.5 pixel is not above it; at 0.49 the cut is 124
    assert sorted_rows(boxes_from_map(cam, 0.5)) == [(1, 1, 1, 1)]
    assert sorted_rows(boxes_from_map(cam, 0.49)) == [(1, 1, 1, 1), (5, 5, 1, 1)]
    assert sorted_rows(boxes_from_map(cam, 1.0)) == []


def test_region_boxes_touch_diagonally_but_holes_do_not():
    cam = np.zeros((5, 5))
    cam[1, 1] = cam[2, 2] = cam[3, 3] = 1.0  # one 8-connected diagonal region
    assert sorted_rows(boxes_from_map(cam, 0.5)) == [(1, 1, 3, 3)]
    ring = np.ones((5, 5))
    ring[1, 2] = ring[2, 1] = ring[2, 3] = ring[3, 2] = ring[2, 2] = 0.0  # a plus-shaped hole
    ring[0, 2] = 0.0  # opened to the border at the top: no longer a hole
    assert sorted_rows(boxes_from_map(ring, 0.5)) == [(0, 0, 5, 5)]


@pytest.mark.parametrize(
    ("gt", "expected"),
    [
        ((2.0, 3.0, 4.0, 2.0), (True, True, True)),  # the region's box itself: IoU 1
        ((2.0, 3.0, 4.0, 4.0), (True, True, False)),  # IoU 8 / 16 = 0.5 exactly: a hit at 0.5
        ((2.0, 3.0, 4.0, 4.000001), (True, False, False)),  # just below 0.5
        ((2.5, 3.0, 4.0, 2.0), (True, True, True)),  # shifted by half a pixel: IoU 7 / 9
    ],
)
def test_iou_boundaries_with_continuous_pixel_boxes(gt, expected):
    """Pixels (row 3..4, column 2..5) make the box (2, 3, 4, 2), compared with CUB's float box as rectangles."""
    cam = np.zeros((1, 12, 12))
    cam[0, 3:5, 2:6] = 1.0
    hits = box_hits(cam, np.array([gt]), thresholds=[0.5])
    assert tuple(hits[0, 0]) == expected


@pytest.mark.parametrize(("length", "expected"), [(3, (True, False, False)), (7, (True, True, True))])
def test_iou_of_exactly_03_and_07_is_a_hit(length, expected):
    """A run of 3 (or 7) pixels inside a 10 x 1 box: IoU 3 / 10 = 0.3 (7 / 10 = 0.7) in floating point too."""
    cam = np.zeros((1, 4, 12))
    cam[0, 1, 1 : 1 + length] = 1.0
    gts = np.array([[1.0, 1.0, 10.0, 1.0], [1.0, 1.0, 10.0, 1.001]])  # exactly, and just below
    hits = box_hits(np.repeat(cam, 2, 0), gts, thresholds=[0.5])[:, 0]
    assert tuple(hits[0]) == expected
    assert tuple(hits[1]) == (length == 7, length == 7, False)


def test_box_iou_by_hand():
    a = np.array([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0], [5.0, 5.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(box_iou(a, [0.0, 0.0, 2.0, 2.0]), [1.0, 1 / 7, 0.0, 0.0])
    np.testing.assert_allclose(box_iou(a[:, None], a[None]).diagonal(), [1.0, 1.0, 1.0, 0.0])  # broadcasting


# --- against the references --------------------------------------------------------------------------------------


def test_boxes_equal_the_per_threshold_reference():
    rng = np.random.default_rng(0)
    for cam in random_maps(rng, 120):
        for threshold in (0.0, *rng.random(3), 0.99):
            assert sorted_rows(boxes_from_map(cam, threshold)) == naive_boxes(cam, threshold)


def test_boxes_equal_opencv_contours():
    """The reference's own pipeline: cv2.threshold, cv2.findContours(RETR_TREE), cv2.boundingRect per contour."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    for cam in random_maps(rng, 120):
        span = cam.max() - cam.min()
        scoremap = ((cam - cam.min()) / span * 255).astype(np.uint8) if span > 0 else np.zeros(cam.shape, np.uint8)
        for threshold in rng.random(3):
            _, binary = cv2.threshold(scoremap, int(threshold * scoremap.max()), 255, cv2.THRESH_BINARY)
            contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
            assert sorted_rows(boxes_from_map(cam, threshold)) == sorted(cv2.boundingRect(c) for c in contours)


def test_hits_equal_the_per_threshold_reference():
    rng = np.random.default_rng(2)
    maps = random_maps(rng, 24)
    for cam in maps:
        h, w = cam.shape
        gts = np.stack(
            [rng.uniform(0, w / 2, 6), rng.uniform(0, h / 2, 6), rng.uniform(0.5, w, 6), rng.uniform(0.5, h, 6)], 1
        )
        np.testing.assert_array_equal(box_hits(np.broadcast_to(cam, (len(gts), h, w)), gts), naive_hits(cam, gts))


def test_hits_on_upsampled_cams_equal_the_reference():
    """CAM-like maps: a coarse ReLU map upsampled bilinearly, with a few thresholds that share 8-bit cuts."""
    g = torch.Generator().manual_seed(3)
    cams = F.interpolate(torch.relu(torch.randn(3, 1, 7, 7, generator=g)), size=(56, 56), mode="bilinear")[:, 0]
    gts = torch.tensor([[10.0, 12.0, 30.0, 25.0], [0.0, 0.0, 56.0, 56.0], [30.5, 2.25, 20.0, 40.0]])
    thresholds = np.array([0.0, 0.1, 0.1001, 0.25, 0.5, 0.75, 0.9])
    ious = (0.1, 0.3, 0.5, 0.7, 0.9)
    expected = np.concatenate(
        [naive_hits(cam, gt[None], thresholds, ious) for cam, gt in zip(cams.numpy(), gts.numpy())]
    )
    np.testing.assert_array_equal(box_hits(cams, gts, thresholds, ious), expected)


def test_maps_labelled_together_stay_apart():
    """box_hits labels small maps in one stacked pass: a region on one map's bottom edge must not join a region on
    the next map's top edge, and each map keeps its own holes, cuts and ground-truth box."""
    bottom = np.zeros((6, 7))
    bottom[3:, 1:6] = 1.0
    bottom[4, 3] = 0.0  # a hole in the region on the bottom edge
    top = np.zeros((6, 7))
    top[:3, 2:5] = 0.6
    top[0, 6] = 1.0  # a second, brighter region on the top edge
    full = np.ones((6, 7))
    full[2, 3] = 0.9  # on everywhere but one pixel at low thresholds: a whole-map region around a hole
    maps = np.stack([bottom, top, full, bottom[::-1].copy()])
    gts = np.array([[1.0, 3.0, 5.0, 3.0], [2.0, 0.0, 3.0, 3.0], [0.0, 0.0, 7.0, 6.0], [1.0, 0.0, 5.0, 3.0]])
    thresholds = np.array([0.0, 0.3, 0.5, 0.7, 0.99])
    ious = (0.1, 0.5, 0.9)
    expected = np.concatenate([naive_hits(cam, gt[None], thresholds, ious) for cam, gt in zip(maps, gts)])
    hits = box_hits(maps, gts, thresholds, ious)
    np.testing.assert_array_equal(hits, expected)
    assert hits[:, :, -1].any(1).all()  # every map finds its own box exactly: nothing merged across maps


def test_large_maps_in_threads_equal_one_thread_and_the_reference():
    """Maps of STACK_PIXELS and up go to ``workers`` threads, each writing its own rows of the result."""
    g = torch.Generator().manual_seed(7)
    cams = F.interpolate(torch.relu(torch.randn(5, 1, 7, 7, generator=g)), size=(184, 180), mode="bilinear")[:, 0]
    assert STACK_PIXELS <= 184 * 180  # one map per task: the threaded path
    gts = torch.tensor(
        [
            [10.0, 12.0, 90.0, 80.0],
            [0.0, 0.0, 180.0, 184.0],
            [60.5, 20.25, 50.0, 100.0],
            [5.0, 100.0, 60.0, 70.0],
            [100.0, 100.0, 70.0, 70.0],
        ]
    )
    thresholds = np.array([0.05, 0.2, 0.4, 0.6, 0.8])
    threaded = box_hits(cams, gts, thresholds, workers=3)
    expected = np.concatenate([naive_hits(cam, gt[None], thresholds) for cam, gt in zip(cams.numpy(), gts.numpy())])
    np.testing.assert_array_equal(threaded, expected)
    np.testing.assert_array_equal(box_hits(cams, gts, thresholds), expected)
    assert 0 < threaded.sum() < threaded.numel()  # the maps differ: rows in the wrong place would show


# --- accuracy from hit counts ------------------------------------------------------------------------------------


def test_max_box_acc_from_hits_by_hand():
    counts = np.array([[4, 1, 0], [3, 3, 1], [4, 2, 2]])  # thresholds 0.2, 0.5, 0.8 x IoU 0.3, 0.5, 0.7
    scores = max_box_acc_from_hits(counts, 4, thresholds=[0.2, 0.5, 0.8])
    assert scores["box_acc_iou30"] == 1.0 and scores["best_threshold_iou30"] == 0.2  # the first of two
    assert scores["box_acc_iou50"] == 0.75 and scores["best_threshold_iou50"] == 0.5
    assert scores["box_acc_iou70"] == 0.5 and scores["best_threshold_iou70"] == 0.8
    assert scores["max_box_acc"] == pytest.approx((1.0 + 0.75 + 0.5) / 3)
    np.testing.assert_array_equal(scores["box_acc_curve"], counts / 4)


def test_max_box_acc_sums_over_batches():
    rng = np.random.default_rng(4)
    cams = rng.random((6, 20, 20)) ** 4
    gts = np.stack([rng.uniform(0, 8, 6), rng.uniform(0, 8, 6), rng.uniform(4, 12, 6), rng.uniform(4, 12, 6)], 1)
    whole = max_box_acc(cams, gts)
    counts = box_hits(cams[:4], gts[:4]).sum(0) + box_hits(cams[4:], gts[4:]).sum(0)
    batched = max_box_acc_from_hits(counts, 6)
    for key, value in whole.items():
        np.testing.assert_array_equal(batched[key], value)


def test_max_box_acc_from_hits_rejects_mismatched_counts():
    with pytest.raises(ValueError, match="hit_counts must be"):
        max_box_acc_from_hits(np.zeros((3, 3)), 4)  # default grid has 100 thresholds
    with pytest.raises(ValueError, match="num_images"):
        max_box_acc_from_hits(np.full((100, 3), 5), 4)


# --- heatmap ratio -------------------------------------------------------------------------------------------------


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


# --- pointing game -------------------------------------------------------------------------------------------------


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


# --- inputs --------------------------------------------------------------------------------------------------------


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
