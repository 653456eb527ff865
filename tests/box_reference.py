"""Reference box extraction for the localization tests (tests/cams): per-threshold scipy.ndimage labelling, as
WSOL's reference code does it with OpenCV, and random maps of every kind."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cubcam.cams.localization import (
    DEFAULT_IOU_THRESHOLDS,
    DEFAULT_THRESHOLDS,
)


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
