"""MaxBoxAccV2 against hand-worked cases, a per-threshold scipy.ndimage reference and OpenCV's contours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from box_reference import naive_boxes, naive_hits, random_maps, sorted_rows

from cubcam.cams.localization import (
    DEFAULT_THRESHOLDS,
    STACK_PIXELS,
    box_hits,
    box_iou,
    boxes_from_map,
    largest_box,
    max_box_acc,
    max_box_acc_from_hits,
)


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


def test_boxes_equal_the_per_threshold_reference():
    rng = np.random.default_rng(0)
    for cam in random_maps(rng, 120):
        for threshold in (0.0, *rng.random(3), 0.99):
            assert sorted_rows(boxes_from_map(cam, threshold)) == naive_boxes(cam, threshold)


def test_the_largest_box_is_the_largest_of_every_box_ties_to_the_first():
    """largest_box (one labelling, what the figures draw) against boxes_from_map's every region and hole."""
    rng = np.random.default_rng(3)
    for cam in [*random_maps(rng, 120), np.zeros((8, 8)), np.kron(np.eye(2), np.ones((3, 3)))]:
        for threshold in (0.0, *rng.random(3), 0.99):
            boxes = boxes_from_map(cam, threshold)
            expected = boxes[int(np.argmax(boxes[:, 2] * boxes[:, 3]))].tolist() if len(boxes) else None
            found = largest_box(cam, threshold)
            assert (None if found is None else found.tolist()) == expected


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
