"""The torch labeller (``backend="torch"``) against the NumPy one, the per-threshold reference and OpenCV's contours:
identical hits on smooth CAM-like maps and on adversarial ones, under ``torch.use_deterministic_algorithms``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from box_reference import naive_hits, random_maps

from cubcam.cams import level_sets
from cubcam.cams.level_sets import LabelStats, level_set_hits
from cubcam.cams.localization import (
    DEFAULT_IOU_THRESHOLDS,
    DEFAULT_THRESHOLDS,
    LocalizationAccumulator,
    box_hits,
    labeller,
)


@pytest.fixture(autouse=True)
def deterministic():
    """Every test here runs with deterministic algorithms required, as the issue asks of the parity tests."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def both(maps, boxes, thresholds=None, ious=DEFAULT_IOU_THRESHOLDS):
    """Hits of both backends, checked equal; the torch ones returned."""
    ours = box_hits(maps, boxes, thresholds, ious, backend="torch")
    theirs = box_hits(maps, boxes, thresholds, ious, backend="numpy")
    assert ours.dtype == torch.bool and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    return ours


def boxes_for(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=generator) * size * 0.5
    wh = (torch.rand(count, 2, generator=generator) * 0.5 + 0.1) * size
    return torch.cat([xy, wh], 1)


@pytest.mark.parametrize(("grid", "size", "count"), [(7, 224, 6), (14, 224, 6), (4, 128, 12)])
def test_smooth_cam_like_maps_give_the_numpy_hits(grid, size, count):
    g = torch.Generator().manual_seed(grid * size)
    coarse = torch.relu(torch.randn(count, 1, grid, grid, generator=g) + 0.3)
    maps = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    hits = both(maps, boxes_for(count, size, g))
    assert 0 < hits.sum() < hits.numel()  # some hits, some misses: a comparison that can fail


def spiral(size: int) -> np.ndarray:
    """A one-pixel-wide on path winding inwards: one region whose rows link only through long detours."""
    on = np.zeros((size, size))
    top, left, bottom, right = 0, 0, size - 1, size - 1
    while top <= bottom and left <= right:
        on[top, left : right + 1] = 1
        on[top : bottom + 1, right] = 1
        on[bottom, left : right + 1] = 1
        on[top + 2 : bottom + 1, left] = 1
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom:
            on[top, left - 2 : left] = 1
    return on


def snake(size: int) -> np.ndarray:
    on = np.zeros((size, size))
    on[::2] = 1
    for r in range(1, size, 2):
        on[r, size - 1 if r % 4 == 1 else 0] = 1
    return on


def rings(size: int) -> np.ndarray:
    """Nested square rings at rising levels: regions inside holes inside regions."""
    r = np.maximum(*np.abs(np.mgrid[:size, :size] - (size - 1) / 2))
    return (np.floor(r) % 4 < 2) * (1 + np.floor(r) / size)


ADVERSARIAL = {
    "spiral": spiral(61),
    "snake": snake(40),
    "rings": rings(33),
    "checkerboard": np.indices((24, 24)).sum(0) % 2 * 1.0,
    "checkerboard of levels": (np.indices((20, 20)).sum(0) % 5) / 4,
    "border pixels": np.pad(np.ones((1, 1)), ((0, 9), (9, 0))) + np.pad(np.ones((1, 1)), ((9, 0), (0, 9))) * 0.5,
    "one pixel": np.ones((1, 1)),
    "one row": np.linspace(0, 1, 17)[None] % 0.3,
    "flat": np.full((9, 9), 0.4),
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_maps_give_the_numpy_hits_and_the_reference(name):
    cam = ADVERSARIAL[name]
    h, w = cam.shape
    rng = np.random.default_rng(len(name))
    gts = np.stack([rng.uniform(0, w / 2, 5), rng.uniform(0, h / 2, 5), rng.uniform(1, w, 5), rng.uniform(1, h, 5)], 1)
    gts[0] = (0, 0, w, h)
    maps = np.broadcast_to(cam, (len(gts), h, w))
    thresholds = np.array([0.0, 0.2, 0.45, 0.7, 0.95])
    ious = (0.05, 0.3, 0.5, 0.9)
    hits = both(maps, gts, thresholds, ious)
    np.testing.assert_array_equal(hits.numpy(), naive_hits(cam, gts, thresholds, ious))


def test_random_maps_of_every_kind_give_the_numpy_hits():
    """Noise, smoothed noise, plateaus and upsampled noise of every shape from 1x1 to 105x105, stacked by shape."""
    rng = np.random.default_rng(11)
    for cam in random_maps(rng, 60):
        h, w = cam.shape
        gts = np.stack([rng.uniform(0, w / 2, 3), rng.uniform(0, h / 2, 3), rng.uniform(1, w, 3), rng.uniform(1, h, 3)])
        both(np.broadcast_to(cam, (3, h, w)), gts.T)


def test_opencv_contour_boxes_give_the_torch_hits():
    """The reference's own pipeline (cv2.threshold, findContours(RETR_TREE), boundingRect) on spirals and noise."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(5)
    cams = [ADVERSARIAL["spiral"], ADVERSARIAL["rings"], *random_maps(rng, 8)]
    for cam in cams:
        span = cam.max() - cam.min()
        scoremap = ((cam - cam.min()) / span * 255).astype(np.uint8) if span > 0 else np.zeros(cam.shape, np.uint8)
        h, w = cam.shape
        gts = np.stack([rng.uniform(0, w / 2, 4), rng.uniform(0, h / 2, 4), rng.uniform(1, w, 4), rng.uniform(1, h, 4)])
        thresholds = rng.random(4)
        hits = box_hits(np.broadcast_to(cam, (4, h, w)), gts.T, thresholds, backend="torch").numpy()
        for t, threshold in enumerate(thresholds):
            _, binary = cv2.threshold(scoremap, int(threshold * scoremap.max()), 255, cv2.THRESH_BINARY)
            contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
            boxes = [cv2.boundingRect(c) for c in contours]
            for g, gt in enumerate(gts.T):
                best = max((iou(b, gt) for b in boxes), default=0.0)
                assert list(hits[g, t]) == [best >= i for i in DEFAULT_IOU_THRESHOLDS]


def iou(a, b) -> float:
    inter = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])) * max(
        0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    )
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def test_maps_split_into_many_passes_give_the_same_hits(monkeypatch):
    """Small budgets: maps go through several quantisation chunks and run passes, one map alone over budget."""
    g = torch.Generator().manual_seed(4)
    maps = F.interpolate(torch.rand(9, 1, 5, 5, generator=g), size=(48, 48), mode="bilinear")[:, 0]
    boxes = boxes_for(9, 48, g)
    whole = both(maps, boxes)
    monkeypatch.setattr(level_sets, "PIXEL_BUDGET", 4 * 48 * 48)
    monkeypatch.setattr(level_sets, "RUN_BUDGET", 1500)
    stats = LabelStats()
    thresholds, ious = torch.as_tensor(DEFAULT_THRESHOLDS), torch.as_tensor(DEFAULT_IOU_THRESHOLDS)
    split = level_set_hits(maps, boxes, thresholds, ious, stats)
    torch.testing.assert_close(split, whole)
    assert stats.passes >= 9  # every map on its own: each has more runs than the budget
    assert stats.rounds <= 2 * math.log2(stats.runs) * stats.passes  # ~2 log2 of the runs, per pass


def test_a_spiral_converges_in_logarithmic_rounds():
    """Min-label propagation needs a round per turn of a 224 px spiral; hooking with contraction needs ~log2."""
    stats = LabelStats()
    cam = torch.from_numpy(spiral(224))[None]
    level_set_hits(cam, torch.tensor([[0.0, 0, 224, 224]]), torch.tensor([0.5]), torch.tensor([0.5]), stats)
    assert stats.rounds <= 2 * math.log2(224 * 224)


def test_auto_picks_torch_on_accelerators_and_numpy_on_the_cpu():
    assert labeller(torch.device("cpu")) == "numpy"
    assert labeller(torch.device("cuda")) == "torch"
    assert labeller(torch.device("cpu"), "torch") == "torch"
    assert labeller(torch.device("mps"), "torch") == "numpy"  # no float64 there
    assert labeller(torch.device("cuda"), "numpy") == "numpy"
    with pytest.raises(ValueError, match="backend must be one of auto, numpy, torch, got 'opencv'"):
        labeller(torch.device("cpu"), "opencv")  # type: ignore[arg-type]


def test_accumulator_rows_are_the_same_with_either_backend():
    g = torch.Generator().manual_seed(6)
    maps = F.interpolate(torch.rand(10, 1, 4, 4, generator=g), size=(40, 40), mode="bilinear")[:, 0]
    boxes = boxes_for(10, 40, g)
    parts = torch.cat([torch.rand(10, 15, 2, generator=g) * 40, (torch.rand(10, 15, 1, generator=g) > 0.5)], 2)
    rows = {}
    for backend in ("numpy", "torch"):
        accumulator = LocalizationAccumulator(12, backend=backend)
        accumulator.update(range(2, 12), maps, boxes, parts)
        rows[backend] = accumulator.rows
    torch.testing.assert_close(rows["torch"], rows["numpy"], rtol=0, atol=0)
    assert rows["torch"][:2].abs().sum() == 0 and (rows["torch"][2:, -1] == 1).all()
