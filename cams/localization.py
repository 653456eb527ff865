"""How well a CAM localizes the object: MaxBoxAccV2, heatmap ratio and pointing game (NumPy/SciPy, no OpenCV).

    from cubcam.cams import localization
    scores = localization.max_box_acc(maps, boxes)   # {"max_box_acc": ..., "box_acc_iou50": ..., ...}
    hits = localization.box_hits(maps, boxes)        # [N, T, I]: sum over batches, then max_box_acc_from_hits

Coordinates are CUB's: a box is ``(x, y, w, h)`` in image pixels and covers the continuous rectangle
[x, x + w] x [y, y + h]; pixel (row r, column c) is the unit square [c, c + 1] x [r, r + 1], its centre is
(c + 0.5, r + 0.5). A region box is therefore the tight ``(x, y, w, h)`` around its pixels, exactly what OpenCV's
``boundingRect`` returns, and IoU is the plain area ratio of the two rectangles.

MaxBoxAccV2 follows the reference code of Choe et al. (CVPR 2020, clovaai/wsolevaluation,
``compute_bboxes_from_scoremaps`` with ``multi_contour_eval=True``) step by step:

- each map is min-max normalised to [0, 1] (the reference requires maps that attain 0 and 1) and quantised like
  the reference: ``q = uint8(255 * map)``; at threshold t a pixel is on iff ``q > int(t * q.max())``;
- the boxes at t are those of every contour ``cv2.findContours(RETR_TREE)`` finds: one per 8-connected region of
  on pixels, and one per hole (a 4-connected off region not touching the image border), whose contour runs
  through the on pixels around it, i.e. the hole's box grown by one pixel on every side;
- an image is a hit at (t, IoU threshold) if any of these boxes reaches that IoU with the ground-truth box
  (CUB has one per image); box accuracy at t is the share of hits, MaxBoxAcc at one IoU threshold is the best
  accuracy over t, and MaxBoxAccV2 averages it over IoU 0.3, 0.5 and 0.7.

The one deliberate difference is the box arithmetic: the reference turns ``boundingRect``'s ``(x, y, w, h)`` into
``x1 = x + w`` (clipped to W - 1) and then adds 1 to widths in its IoU, which inflates every box by one pixel
(except at the image's right and bottom edge). We compare the tight boxes with CUB's float boxes directly.
Thresholds, quantisation, regions and the hit rule are the reference's; ``tests/test_localization.py`` checks the
boxes against the OpenCV pipeline itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch
from scipy import sparse
from scipy.sparse import csgraph

ArrayLike = torch.Tensor | np.ndarray | Sequence

DEFAULT_THRESHOLDS = np.arange(0, 1, 0.01)  # the reference's CAM threshold grid (cam_curve_interval=0.01)
DEFAULT_IOU_THRESHOLDS = (0.3, 0.5, 0.7)
STACK_PIXELS = 32768  # maps labelled in one pass: enough small maps to amortise the per-call cost, few enough to
# keep the run arrays in cache (larger stacks ran slower per map; bench/localization_speed.py)


# --- MaxBoxAccV2 -------------------------------------------------------------------------------------------------


def box_hits(
    cams: ArrayLike,
    boxes: ArrayLike,
    thresholds: ArrayLike | None = None,
    iou_thresholds: ArrayLike = DEFAULT_IOU_THRESHOLDS,
    workers: int = 1,
) -> np.ndarray:
    """Per image, threshold and IoU threshold: does any region box at that threshold reach that IoU with the GT box?

    ``cams`` [N, H, W], ``boxes`` [N, 4] xywh -> bool [N, T, I]. Summed over images (also over batches and ranks)
    this is all :func:`max_box_acc_from_hits` needs, so large evaluations never keep the maps.

    Small maps are labelled several at a time (``STACK_PIXELS``). Maps of that size and up (about 180 px square) go
    to ``workers`` threads: their array operations are large enough to release the GIL, while on smaller maps the
    interpreter's share dominates and threads do not pay (``bench/localization_speed.py``).
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    maps = _maps(cams)
    gt = _boxes(boxes, len(maps))
    thresholds = _thresholds(thresholds)
    ious = _iou_thresholds(iou_thresholds)
    hits = np.zeros((len(maps), len(thresholds), len(ious)), dtype=bool)
    stack = max(1, STACK_PIXELS // (maps.shape[1] * maps.shape[2]))

    def label(first: int, stop: int) -> None:
        for start in range(first, stop, stack):
            depth, level_of = _depths(_quantize(maps[start : min(start + stack, stop)]), thresholds)
            image, level, regions = _region_boxes(depth)
            best = np.zeros((len(depth), len(thresholds)))  # [n, cut index]; at most T distinct cuts per map
            np.maximum.at(best, (image, level), box_iou(regions, gt[start + image]))
            hits[start : start + len(depth)] = np.take_along_axis(best, level_of, 1)[:, :, None] >= ious

    workers = min(workers, len(maps)) if stack == 1 else 1
    if workers <= 1:  # also for no maps at all
        label(0, len(maps))
        return hits
    bounds = np.linspace(0, len(maps), workers + 1).round().astype(int)  # one run of neighbouring maps per thread
    with ThreadPoolExecutor(workers, thread_name_prefix="box_hits") as pool:
        list(pool.map(label, bounds[:-1], bounds[1:]))  # list(): re-raises a thread's error here
    return hits


def max_box_acc_from_hits(
    hit_counts: ArrayLike,
    num_images: int,
    thresholds: ArrayLike | None = None,
    iou_thresholds: ArrayLike = DEFAULT_IOU_THRESHOLDS,
) -> dict[str, float | np.ndarray]:
    """MaxBoxAccV2 from hit counts [T, I] (``box_hits(...).sum(0)``, summed over batches) of ``num_images`` images.

    Returns fractions in [0, 1]: ``max_box_acc`` (mean over the IoU thresholds of the best-threshold accuracy),
    per IoU threshold ``box_acc_iou30`` / ``box_acc_iou50`` / ``box_acc_iou70`` and the threshold that achieves it,
    ``best_threshold_iou30`` ... (the lowest one on ties), and ``box_acc_curve``, the accuracy [T, I] at every
    threshold (the only non-scalar value).
    """
    thresholds = _thresholds(thresholds)
    ious = _iou_thresholds(iou_thresholds)
    counts = _numpy(hit_counts, "hit_counts")
    if counts.shape != (len(thresholds), len(ious)):
        raise ValueError(
            f"hit_counts must be [T, I] = [{len(thresholds)}, {len(ious)}] for these thresholds, "
            f"got shape {counts.shape}"
        )
    if num_images <= 0 or (counts < 0).any() or (counts > num_images).any():
        raise ValueError(
            f"need num_images > 0 and 0 <= hit_counts <= num_images, got {num_images} images and "
            f"counts in [{counts.min()}, {counts.max()}]"
        )
    accuracy = counts / num_images
    best = accuracy.argmax(0)
    scores: dict[str, float | np.ndarray] = {"max_box_acc": float(accuracy.max(0).mean())}
    for j, name in enumerate(_iou_names(ious)):
        scores[f"box_acc_{name}"] = float(accuracy[best[j], j])
        scores[f"best_threshold_{name}"] = float(thresholds[best[j]])
    scores["box_acc_curve"] = accuracy
    return scores


def max_box_acc(
    cams: ArrayLike,
    boxes: ArrayLike,
    thresholds: ArrayLike | None = None,
    iou_thresholds: ArrayLike = DEFAULT_IOU_THRESHOLDS,
    workers: int = 1,
) -> dict[str, float | np.ndarray]:
    """MaxBoxAccV2 of a set of maps [N, H, W] against their GT boxes [N, 4] (see :func:`max_box_acc_from_hits`)."""
    hits = box_hits(cams, boxes, thresholds, iou_thresholds, workers)
    return max_box_acc_from_hits(hits.sum(0), len(hits), thresholds, iou_thresholds)


def boxes_from_map(cam: ArrayLike, threshold: float) -> np.ndarray:
    """The boxes MaxBoxAccV2 scores for one map [H, W] at one threshold: int64 [K, 4] xywh, sorted by (y, x, w, h).

    One box per 8-connected region of ``uint8(255 * map) > int(threshold * max)`` (map min-max normalised first)
    and one per hole in a region (see the module doc); [0, 4] when nothing is on.
    """
    array = _numpy(cam, "cam")
    if array.ndim != 2:
        raise ValueError(f"cam must be one map [H, W], got shape {array.shape}")
    depth, _ = _depths(_quantize(_maps(array[None])), _thresholds([threshold]))
    _, _, regions = _region_boxes(depth)
    return regions[np.lexsort(regions.T[[3, 2, 0, 1]])]


def box_iou(boxes_a: ArrayLike, boxes_b: ArrayLike) -> np.ndarray:
    """IoU of xywh boxes, broadcast over leading dimensions ([..., 4] with [..., 4]); 0 where both are empty."""
    a, b = _numpy(boxes_a, "boxes_a"), _numpy(boxes_b, "boxes_b")
    if a.shape[-1:] != (4,) or b.shape[-1:] != (4,):
        raise ValueError(f"boxes must be [..., 4] (x, y, w, h), got shapes {a.shape} and {b.shape}")
    iw = np.clip(np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return np.divide(inter, union, out=np.zeros_like(union), where=union > 0)


# --- heatmap ratio and pointing game -------------------------------------------------------------------------------


def heatmap_ratio(cams: ArrayLike, boxes: ArrayLike) -> np.ndarray:
    """Share of each map's mass inside its GT box, float [N] in [0, 1] ("energy-based pointing game").

    Maps are used as given (non-negative, e.g. the engine's normalised maps); a pixel the box edge cuts counts
    with the covered fraction of its area, so float boxes are exact. An all-zero map puts no mass anywhere and
    scores 0, so a CAM that looks at nothing gets no credit (never NaN).
    """
    maps = _maps(cams)
    gt = _boxes(boxes, len(maps))
    if (maps < 0).any():
        raise ValueError("heatmap_ratio needs non-negative maps (mass); got negative values")
    rows = _coverage(gt[:, 1], gt[:, 3], maps.shape[1])  # [N, H]
    cols = _coverage(gt[:, 0], gt[:, 2], maps.shape[2])  # [N, W]
    inside = np.einsum("nhw,nh,nw->n", maps, rows, cols)
    total = maps.sum((1, 2))
    return np.divide(inside, total, out=np.zeros_like(total), where=total > 0)


def pointing_game(
    cams: ArrayLike, boxes: ArrayLike | None = None, parts: ArrayLike | None = None, radius: float = 15.0
) -> np.ndarray:
    """Does each map point at the object? float [N]: 1.0 hit, 0.0 miss, NaN when there is nothing to point at.

    Give ``boxes`` [N, 4] xywh (hit: the maximum lies in the box) or ``parts`` [N, P, 3] (x, y, visible), as the
    dataset gives them (hit: the maximum lies within ``radius`` px of a visible part, 15 px as in Zhang et al.,
    2016; NaN for an image without visible parts). A pixel's position is its centre. Ties: the map points at all
    its maximal pixels and hits only if every one of them qualifies, so the result never depends on scan order;
    a flat map (including all zeros) points nowhere and never hits.
    """
    maps = _maps(cams)
    if (boxes is None) == (parts is None):
        raise ValueError("pointing_game needs boxes or parts (exactly one of them)")
    peak = maps.max((1, 2), keepdims=True)
    maxima = (maps == peak) & (peak > maps.min((1, 2), keepdims=True))
    n, h, w = maps.shape
    if boxes is not None:
        gt = _boxes(boxes, n)
        ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
        in_rows = (ys >= gt[:, 1:2]) & (ys <= gt[:, 1:2] + gt[:, 3:4])
        in_cols = (xs >= gt[:, 0:1]) & (xs <= gt[:, 0:1] + gt[:, 2:3])
        qualifies = in_rows[:, :, None] & in_cols[:, None, :]
        return (maxima.any((1, 2)) & ~(maxima & ~qualifies).any((1, 2))).astype(np.float64)
    assert parts is not None  # one of the two was given
    points = _numpy(parts, "parts")
    if points.ndim != 3 or points.shape[0] != n or points.shape[2] != 3 or not np.isfinite(points).all():
        raise ValueError(f"parts must be finite [N, P, 3] (x, y, visible) with N = {n}, got shape {points.shape}")
    if not radius >= 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    result = np.full(n, np.nan)
    for i in range(n):
        visible = points[i, points[i, :, 2] > 0.5, :2]
        if len(visible) == 0:
            continue
        r, c = np.nonzero(maxima[i])
        distance = np.hypot(c[:, None] + 0.5 - visible[None, :, 0], r[:, None] + 0.5 - visible[None, :, 1])
        result[i] = float(len(r) > 0 and bool((distance.min(1) <= radius).all()))
    return result


# --- boxes as data gives them ----------------------------------------------------------------------------------


def check_boxes(boxes: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes [N, 4] (x, y, w, h) of images of ``sizes`` [N, 2] (width, height; inf where unknown) as the metrics can
    score them: ``(clipped, valid, was_clipped)``.

    A box reaching outside its image is clipped to it (a few CUB boxes overhang by a pixel); a box that is not
    finite, has a width or height of 0 or less, or lies wholly outside its image is not ``valid``: scoring it
    would count a miss that says nothing about the map.
    """
    boxes = boxes.reshape(-1, 4).to(torch.float64)
    sizes = sizes.reshape(-1, 2).to(torch.float64)
    finite = torch.isfinite(boxes).all(1)
    x0, y0 = boxes[:, 0].clamp(min=0), boxes[:, 1].clamp(min=0)
    x1 = torch.minimum(boxes[:, 0] + boxes[:, 2], sizes[:, 0])
    y1 = torch.minimum(boxes[:, 1] + boxes[:, 3], sizes[:, 1])
    clipped = torch.stack([x0, y0, x1 - x0, y1 - y0], 1)
    valid = finite & (boxes[:, 2] > 0) & (boxes[:, 3] > 0) & (clipped[:, 2] > 0) & (clipped[:, 3] > 0)
    was_clipped = valid & ((clipped - boxes).abs() > 1e-6).any(1)
    clipped = torch.where(valid[:, None], clipped, boxes)
    return clipped.float(), valid, was_clipped


# --- one accumulator for every consumer ----------------------------------------------------------------------------


class LocalizationAccumulator:
    """All of the above over many batches (and processes): ``update`` with maps, ``merge`` across ranks, ``compute``.

    The callback and ``cubcam evaluate`` both use it, so the same maps give the same numbers. State is one float64
    row per *slot* (an image's place in the evaluated set, e.g. its position in the metric subset): the hits of
    every (threshold, IoU threshold), the heatmap ratio, the box pointing game, the part pointing game and a count.
    Summing rows across ranks and dividing by the count means an image validated twice (``DistributedSampler``
    pads the last ranks with repeats) counts once, where a plain sum of hits would count it twice. Rows are small
    (about 2.4 KB), so a whole CUB split fits in 14 MB; the maps themselves are never kept.

    Keys of :meth:`compute`: those of :func:`max_box_acc_from_hits`, ``heatmap_ratio``, ``pointing_game`` (the
    map's peak inside the GT box), ``pointing_game_parts`` (the peak within ``radius`` px of a visible part; only
    when parts were given, over the images that have visible parts: ``pointing_game_parts_images``) and
    ``num_images``.
    """

    def __init__(
        self,
        num_slots: int,
        thresholds: ArrayLike | None = None,
        iou_thresholds: ArrayLike = DEFAULT_IOU_THRESHOLDS,
        workers: int = 1,
        radius: float = 15.0,
    ):
        if not isinstance(num_slots, int) or num_slots < 0:
            raise ValueError(f"num_slots must be a non-negative integer, got {num_slots!r}")
        self.thresholds = _thresholds(thresholds)
        self.iou_thresholds = _iou_thresholds(iou_thresholds)
        self.workers, self.radius = workers, radius
        self.num_hits = len(self.thresholds) * len(self.iou_thresholds)
        # columns: hits | heatmap ratio | pointing game (box) | pointing game (parts) | has visible parts | count
        self.rows = torch.zeros(num_slots, self.num_hits + 5, dtype=torch.float64)

    def update(
        self,
        slots: ArrayLike,
        maps: ArrayLike,
        boxes: ArrayLike,
        parts: ArrayLike | None = None,
        hits: np.ndarray | None = None,
    ) -> None:
        """Add maps [B, H, W] of the images in ``slots`` [B] with their GT boxes [B, 4] (and parts [B, P, 3]);
        ``hits`` [B, T, I] when already known (a fixed baseline map's)."""
        index = torch.as_tensor(np.asarray(slots, dtype=np.int64))
        cams = _maps(maps, finite=False)  # a non-finite map is scored NaN below
        if index.shape != (len(cams),) or (len(index) and (index.min() < 0 or index.max() >= len(self.rows))):
            raise ValueError(f"slots must be [{len(cams)}] indices in [0, {len(self.rows)}), got {index.tolist()[:8]}")
        finite = np.isfinite(cams).reshape(len(cams), -1).all(1)
        if not finite.all():  # a diverged model's maps: scored as NaN (compute then gives NaN), never as misses
            cams = np.where(finite[:, None, None], cams, 0.0).astype(cams.dtype)
        if hits is None:
            hits = box_hits(cams, boxes, self.thresholds, self.iou_thresholds, self.workers)
        values = np.zeros((len(cams), self.rows.shape[1]))
        values[:, : self.num_hits] = hits.reshape(len(cams), -1)
        values[:, self.num_hits] = heatmap_ratio(cams, boxes)
        values[:, self.num_hits + 1] = pointing_game(cams, boxes=boxes)
        if parts is not None:
            pointed = pointing_game(cams, parts=parts, radius=self.radius)
            known = ~np.isnan(pointed)  # an image without visible parts has nothing to point at
            values[:, self.num_hits + 2] = np.where(known, pointed, 0.0)
            values[:, self.num_hits + 3] = known
        values[~finite, :-1] = np.nan
        values[:, -1] = 1.0
        self.rows.index_add_(0, index, torch.from_numpy(values))

    def add_rows(self, slots: ArrayLike, rows: torch.Tensor) -> None:
        """Add the rows [B, C] another accumulator made for images in ``slots`` (e.g. one of B slots, in a worker
        process: ``cubcam.cams.labelling``); an image's row is the same wherever it is computed, and adding it to
        its slot's zeros is exact."""
        index = torch.as_tensor(np.asarray(slots, dtype=np.int64))
        if rows.shape != (len(index), self.rows.shape[1]):
            raise ValueError(f"rows must be [{len(index)}, {self.rows.shape[1]}], got {tuple(rows.shape)}")
        self.rows.index_add_(0, index, rows.to(torch.float64))

    def merge(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the rows over processes with ``reduce_sum`` (e.g. Lightning's ``strategy.reduce(t, "sum")``, moved
        to the process's device and back); afterwards every rank computes the same scores."""
        self.rows = reduce_sum(self.rows).to("cpu", torch.float64)

    @property
    def num_images(self) -> int:
        return int((self.rows[:, -1] > 0).sum())

    def compute(self, slots: ArrayLike | None = None) -> dict[str, float | np.ndarray]:
        """The scores over every slot seen at least once (each counted once), or over those of ``slots`` (e.g. one
        class's images); ValueError if none was seen."""
        seen = self.rows[:, -1] > 0
        if slots is not None:
            chosen = torch.zeros_like(seen)
            chosen[torch.as_tensor(np.asarray(slots, dtype=np.int64))] = True
            seen &= chosen
        if not seen.any():
            raise ValueError("no image was added to the localization accumulator")
        rows = (self.rows[seen] / self.rows[seen, -1:]).numpy()
        h = self.num_hits
        counts = rows[:, :h].sum(0).reshape(len(self.thresholds), -1).round()
        scores = max_box_acc_from_hits(counts, len(rows), self.thresholds, self.iou_thresholds)
        scores["heatmap_ratio"] = float(rows[:, h].mean())
        scores["pointing_game"] = float(rows[:, h + 1].mean())
        known = rows[:, h + 3] > 0.5
        if known.any():
            scores["pointing_game_parts"] = float(rows[known, h + 2].mean())
        scores["pointing_game_parts_images"] = int(known.sum())
        non_finite = int(np.isnan(rows[:, h]).sum())
        if non_finite:  # some map was not finite (a diverged model): no score means anything, all are NaN
            scores = {
                key: np.full(np.shape(value), np.nan) if np.ndim(value) else math.nan for key, value in scores.items()
            }
            scores["non_finite_images"] = non_finite
        scores["num_images"] = len(rows)
        return scores


# --- regions at every threshold in one pass ------------------------------------------------------------------------


def _quantize(cams: np.ndarray) -> np.ndarray:
    """The reference's 8-bit score maps [N, H, W] of min-max normalised maps (float64, as it computes)."""
    low, high = cams.min((1, 2), keepdims=True), cams.max((1, 2), keepdims=True)
    span = np.where(high > low, high - low, 1.0)  # a flat map: cams - low is 0, and so is its quantisation
    return ((cams - low) / span * 255).astype(np.uint8)


def _depths(q: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's count of the map's distinct cuts below it, int64 [N, H, W], and each threshold's cut index
    [N, T]: a pixel is on at cut index j iff its depth > j.

    The cut of a threshold is the reference's ``int(threshold * max)`` (pixels with q > cut are on); thresholds
    that give one map the same cut share a cut index, so each distinct level set is labelled once.
    """
    cuts = (thresholds[None, :] * q.max((1, 2)).astype(np.int64)[:, None]).astype(np.int64)  # [N, T] in 0..255
    present = np.zeros((len(q), 256), np.int64)
    np.put_along_axis(present, cuts, 1, 1)
    below = np.cumsum(present, 1) - present  # [N, v]: distinct cuts < v
    offset = 256 * np.arange(len(q))
    return below.ravel()[q + offset[:, None, None]], np.take_along_axis(below, cuts, 1)


def _region_boxes(depth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All region and hole boxes of ``depth > j`` for every cut index j of every map [N, H, W] at once:
    (map [R], j [R], xywh int64 [R, 4]).

    The on-set's holes are the components of the off-set that do not touch the map's border. That second pass
    costs as much as the first, so it runs only over the cuts that have a hole (components > Euler number),
    usually few.
    """
    count, height, width = depth.shape
    top = int(depth.max(initial=0))
    if top == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.int64)
    image, level, x0, y0, x1, y1, euler = _level_set_components(depth, eight=True)
    components = np.bincount(image * (top + 1) + level, minlength=count * (top + 1)).reshape(count, top + 1)
    images, levels, boxes = [image], [level - 1], [np.stack([x0, y0, x1 - x0, y1 - y0], 1)]
    has_hole = components[:, 1:] > euler[:, 1:]  # [N, j]
    if has_hole.any():
        # At cut j a pixel is off iff depth <= j. Count the hole cuts at or above each pixel's depth: level l of
        # that count is the off-set at the map's l-th highest hole cut.
        above = np.concatenate([np.cumsum(has_hole[:, ::-1], 1)[:, ::-1], np.zeros((count, 1), np.int64)], 1)
        off_count = np.take_along_axis(above, depth.reshape(count, -1), 1).reshape(depth.shape)
        cut_of = np.zeros((count, int(above.max()) + 1), np.int64)
        n, j = np.nonzero(has_hole)
        cut_of[n, above[n, j]] = j
        image, level, x0, y0, x1, y1, _ = _level_set_components(off_count, eight=False)
        inner = (x0 > 0) & (y0 > 0) & (x1 < width) & (y1 < height)  # touching the border: outside, not a hole
        image, level, x0, y0, x1, y1 = (v[inner] for v in (image, level, x0, y0, x1, y1))
        images.append(image)
        levels.append(cut_of[image, level])
        boxes.append(np.stack([x0 - 1, y0 - 1, x1 - x0 + 2, y1 - y0 + 2], 1))  # the contour around the hole
    return np.concatenate(images), np.concatenate(levels), np.concatenate(boxes)


def _level_set_components(depth: np.ndarray, eight: bool) -> tuple[np.ndarray, ...]:
    """Bounding boxes of the connected components of ``depth >= i`` for every level i = 1 .. depth.max() of every
    map [N, H, W] at once.

    Labelling each level separately costs levels x pixels. Instead every level set is cut into horizontal runs
    (found from the steps of ``depth`` along the rows, so their number is the maps' total variation), runs of the
    same level in neighbouring rows that touch are linked, and one sparse connected-components call labels all
    levels together. The maps are stacked into one tall image with an empty row below each, so one labelling
    serves them all and no region crosses into the next map. Returns (map, level, x0, y0, x1, y1) per component
    (x1, y1 exclusive, in the map's pixels) and the Euler number (components - holes) of every map's every level,
    [N, depth.max() + 1]: runs minus linked pairs (the run graph has one independent cycle per hole).
    """
    maps, rows, width = depth.shape[0], depth.shape[1] + 1, depth.shape[2]
    height = maps * rows
    padded = np.zeros((maps, rows, width + 2), np.int64)
    padded[:, :-1, 1:-1] = depth
    padded = padded.reshape(height, width + 2)
    left, right = padded[:, :-1].ravel(), padded[:, 1:].ravel()  # the two sides of every column boundary
    level, row, start = _crossings(left, right, width + 1)  # a run of level i starts where left < i <= right
    _, _, end = _crossings(right, left, width + 1)  # and ends (exclusive) where right < i <= left
    # Runs are sorted by (level, row, start); keys keep that order, with room for the row below the last one.
    key = (level * (height + 1) + row) * (width + 1)
    below = key + width + 1
    # Touching runs in the row below: 8-connected if they overlap after growing by one pixel, 4-connected if they
    # overlap. Within a (level, row) group runs are disjoint and sorted, so the partners form one slice.
    side: tuple[Literal["left", "right"], Literal["left", "right"]] = ("left", "right") if eight else ("right", "left")
    first = np.searchsorted(key + end, below + start, side[0])
    partners = np.clip(np.searchsorted(key + start, below + end, side[1]) - first, 0, None)
    _, partner = _expand(first, partners)
    indptr = np.concatenate([[0], np.cumsum(partners)])
    graph = sparse.csr_array((np.ones(len(partner), bool), partner, indptr), shape=(len(key), len(key)))
    count, label = csgraph.connected_components(graph, directed=False)
    x0, y0 = np.full(count, width), np.full(count, height)
    x1, y1 = np.zeros(count, np.int64), np.zeros(count, np.int64)
    np.minimum.at(x0, label, start)
    np.minimum.at(y0, label, row)
    np.maximum.at(x1, label, end)
    np.maximum.at(y1, label, row + 1)
    component_level = np.empty(count, np.int64)
    component_level[label] = level
    top = int(depth.max(initial=0))
    slot = level if maps == 1 else row // rows * (top + 1) + level
    euler = (
        np.bincount(slot, minlength=maps * (top + 1)) - np.bincount(slot, weights=partners, minlength=maps * (top + 1))
    ).reshape(maps, top + 1)
    image = y0 // rows
    return image, component_level, x0, y0 - image * rows, x1, y1 - image * rows, euler


def _crossings(low: np.ndarray, high: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (level, row, column) with low < level <= high at a boundary, sorted by (level, row, column)."""
    where = np.flatnonzero(high > low)
    boundary, level = _expand(low[where] + 1, high[where] - low[where])
    order = np.argsort(level.astype(np.int16), kind="stable")  # radix sort; boundaries already run row-major
    row, column = np.divmod(where[boundary[order]], width)
    return level[order], row, column


def _expand(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ranges [starts[k], starts[k] + counts[k]) concatenated, with k for each element (vectorised)."""
    owner = np.repeat(np.arange(len(counts)), counts)
    values = np.arange(len(owner)) + np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return owner, values


# --- input checks --------------------------------------------------------------------------------------------------


def _numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a tensor or an array of numbers, got {type(x).__name__}") from err


def _maps(cams: ArrayLike, finite: bool = True) -> np.ndarray:
    maps = _numpy(cams, "cams")
    if maps.ndim != 3 or 0 in maps.shape[1:]:
        raise ValueError(f"cams must be [N, H, W] with H, W > 0, got shape {maps.shape}")
    if finite and not np.isfinite(maps).all():
        raise ValueError("cams contain NaN or infinite values")
    return maps


def _boxes(boxes: ArrayLike, n: int) -> np.ndarray:
    gt = _numpy(boxes, "boxes")
    if gt.shape != (n, 4):
        raise ValueError(f"boxes must be [N, 4] (x, y, w, h) with N = {n} (one per map), got shape {gt.shape}")
    if not np.isfinite(gt).all() or (gt[:, 2:] < 0).any():
        raise ValueError("boxes must be finite (x, y, w, h) with w, h >= 0")
    return gt


def _thresholds(thresholds: ArrayLike | None) -> np.ndarray:
    t = DEFAULT_THRESHOLDS if thresholds is None else _numpy(thresholds, "thresholds")
    if t.ndim != 1 or len(t) == 0 or not ((t >= 0) & (t <= 1)).all():
        raise ValueError(f"thresholds must be a non-empty 1-D sequence in [0, 1], got {t}")
    return t


def _iou_thresholds(iou_thresholds: ArrayLike) -> np.ndarray:
    t = _numpy(iou_thresholds, "iou_thresholds")
    if t.ndim != 1 or len(t) == 0 or not ((t > 0) & (t <= 1)).all():
        raise ValueError(f"iou_thresholds must be a non-empty 1-D sequence in (0, 1], got {t}")
    return t


def _iou_names(ious: np.ndarray) -> list[str]:
    names = [f"iou{round(100 * float(t))}" for t in ious]
    if len(set(names)) != len(names):
        raise ValueError(f"iou_thresholds must differ in percent, got {ious}")
    return names


def _coverage(start: np.ndarray, length: np.ndarray, n: int) -> np.ndarray:
    """[N, n]: the fraction of each unit pixel interval [k, k + 1] inside [start, start + length]."""
    k = np.arange(n)
    return np.clip(np.minimum(k + 1, start[:, None] + length[:, None]) - np.maximum(k, start[:, None]), 0, 1)
