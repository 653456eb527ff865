"""How well a CAM localizes the object: MaxBoxAccV2, heatmap ratio and pointing game, on the maps' device.

    from cubcam.cams import localization
    scores = localization.max_box_acc(maps, boxes)   # {"max_box_acc": ..., "box_acc_iou50": ..., ...}
    hits = localization.box_hits(maps, boxes)        # [N, T, I]: sum over batches, then max_box_acc_from_hits

MaxBoxAccV2's region labelling has two backends with the same hits: NumPy/SciPy here (the faster on a CPU) and
torch in :mod:`cubcam.cams.level_sets` (on any device); the heatmap ratio and pointing games are torch. No OpenCV.

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
from scipy import ndimage, sparse
from scipy.sparse import csgraph
from torch import Tensor

from cubcam.cams import level_sets
from cubcam.cams.level_sets import level_set_hits

ArrayLike = torch.Tensor | np.ndarray | Sequence
Backend = Literal["auto", "numpy", "torch"]
BACKENDS: tuple[Backend, ...] = ("auto", "numpy", "torch")

DEFAULT_THRESHOLDS = np.arange(0, 1, 0.01)  # the reference's CAM threshold grid (cam_curve_interval=0.01)
DEFAULT_IOU_THRESHOLDS = (0.3, 0.5, 0.7)
PEAK_TOLERANCE = 1e-5  # of a map's range: pixels this close to its peak are maxima too (float rounding is ~1e-7)
STACK_PIXELS = 32768  # maps labelled in one pass: enough small maps to amortise the per-call cost, few enough to
# keep the run arrays in cache (larger stacks ran slower per map; bench/localization_speed.py)


# --- MaxBoxAccV2 -------------------------------------------------------------------------------------------------


def box_hits(
    cams: ArrayLike,
    boxes: ArrayLike,
    thresholds: ArrayLike | None = None,
    iou_thresholds: ArrayLike = DEFAULT_IOU_THRESHOLDS,
    workers: int = 1,
    backend: Backend = "auto",
) -> Tensor:
    """Per image, threshold and IoU threshold: does any region box at that threshold reach that IoU with the GT box?

    ``cams`` [N, H, W], ``boxes`` [N, 4] xywh -> bool tensor [N, T, I] on the maps' device (the CPU for arrays).
    Summed over images (also over batches and ranks) this is all :func:`max_box_acc_from_hits` needs, so large
    evaluations never keep the maps.

    ``backend``: ``"torch"`` labels with torch ops on the maps' device (:mod:`cubcam.cams.level_sets`; no host copy
    of the maps), ``"numpy"`` with NumPy and SciPy on the CPU, ``"auto"`` picks torch for accelerator tensors and
    NumPy for CPU tensors, where it is the faster (``bench/localization_speed.py``). Both give the same hits. A
    device without float64 (MPS) labels with NumPy. ``workers``: threads for the NumPy labeller's large maps.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    maps = _maps(cams)
    gt = _boxes(boxes, len(maps), maps.device)
    return _box_hits(maps, gt, _thresholds(thresholds), _iou_thresholds(iou_thresholds), workers, backend)


def _box_hits(
    maps: Tensor, gt: Tensor, thresholds: np.ndarray, ious: np.ndarray, workers: int, backend: Backend
) -> Tensor:
    """:func:`box_hits` of checked maps and boxes (float64, on one device)."""
    if labeller(maps.device, backend) == "torch":
        return level_set_hits(maps, gt, torch.from_numpy(thresholds), torch.from_numpy(ious))
    hits = _numpy_box_hits(_host(maps), _host(gt), thresholds, ious, workers)
    return torch.from_numpy(hits).to(maps.device)


def labeller(device: torch.device, backend: Backend = "auto") -> Literal["numpy", "torch"]:
    """Which labeller ``box_hits`` runs for maps on ``device``: see its ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if device.type == "mps" or (backend == "auto" and device.type == "cpu"):
        return "numpy"
    return "numpy" if backend == "numpy" else "torch"


def _numpy_box_hits(
    maps: np.ndarray, gt: np.ndarray, thresholds: np.ndarray, ious: np.ndarray, workers: int
) -> np.ndarray:
    """:func:`box_hits` with NumPy and SciPy. Small maps are labelled several at a time (``STACK_PIXELS``); maps of
    that size and up (about 180 px square) go to ``workers`` threads: their array operations are large enough to
    release the GIL, while on smaller maps the interpreter's share dominates and threads do not pay."""
    hits = np.zeros((len(maps), len(thresholds), len(ious)), dtype=bool)
    stack = max(1, STACK_PIXELS // (maps.shape[1] * maps.shape[2]))

    def label(first: int, stop: int) -> None:
        for start in range(first, stop, stack):
            depth, level_of = _depths(_quantize(maps[start : min(start + stack, stop)]), thresholds)
            image, level, regions = _region_boxes(depth)
            best = np.zeros((len(depth), len(thresholds)))  # [n, cut index]; at most T distinct cuts per map
            np.maximum.at(best, (image, level), box_iou(regions, gt[start + image]).numpy())
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
    backend: Backend = "auto",
) -> dict[str, float | np.ndarray]:
    """MaxBoxAccV2 of a set of maps [N, H, W] against their GT boxes [N, 4] (see :func:`max_box_acc_from_hits`)."""
    hits = box_hits(cams, boxes, thresholds, iou_thresholds, workers, backend)
    return max_box_acc_from_hits(hits.sum(0), len(hits), thresholds, iou_thresholds)


def boxes_from_map(cam: ArrayLike, threshold: float) -> np.ndarray:
    """The boxes MaxBoxAccV2 scores for one map [H, W] at one threshold: int64 [K, 4] xywh, sorted by (y, x, w, h).

    One box per 8-connected region of ``uint8(255 * map) > int(threshold * max)`` (map min-max normalised first)
    and one per hole in a region (see the module doc); [0, 4] when nothing is on.
    """
    array = _numpy(cam, "cam")
    if array.ndim != 2:
        raise ValueError(f"cam must be one map [H, W], got shape {array.shape}")
    depth, _ = _depths(_quantize(_host(_maps(array[None]))), _thresholds([threshold]))
    _, _, regions = _region_boxes(depth)
    return regions[np.lexsort(regions.T[[3, 2, 0, 1]])]


def largest_box(cam: ArrayLike, threshold: float) -> np.ndarray | None:
    """The largest (by area) of :func:`boxes_from_map`'s boxes of one finite map [H, W] at ``threshold``, int64 xywh,
    or None when nothing is on; ties go to the first in its order. The box of the largest 8-connected region (a hole's
    box lies strictly inside its region's), found by one labelling (``scipy.ndimage``): what a figure draws, at a
    tenth of the cost of every region and hole."""
    array = _numpy(cam, "cam")
    if array.ndim != 2:
        raise ValueError(f"cam must be one map [H, W], got shape {array.shape}")
    q = _quantize(array[None].astype(np.float64))[0]
    mask = q > int(threshold * int(q.max()))
    if not mask.any():
        return None
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    found = ndimage.find_objects(labels)
    boxes = np.array([(x.start, y.start, x.stop - x.start, y.stop - y.start) for y, x in found], dtype=np.int64)
    order = np.lexsort(boxes.T[[3, 2, 0, 1]])  # boxes_from_map's order: by y, x, w, h
    areas = boxes[order, 2] * boxes[order, 3]
    return boxes[order[int(np.argmax(areas))]]


def box_iou(boxes_a: ArrayLike, boxes_b: ArrayLike) -> Tensor:
    """IoU of xywh boxes, broadcast over leading dimensions ([..., 4] with [..., 4]); 0 where both are empty.
    Float64, on the first argument's device."""
    a = _float64(boxes_a, "boxes_a")
    b = _float64(boxes_b, "boxes_b", a.device)
    if a.shape[-1:] != (4,) or b.shape[-1:] != (4,):
        raise ValueError(f"boxes must be [..., 4] (x, y, w, h), got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return level_sets.box_iou(a, b)


# --- heatmap ratio and pointing game -------------------------------------------------------------------------------


def heatmap_ratio(cams: ArrayLike, boxes: ArrayLike) -> Tensor:
    """Share of each map's mass inside its GT box, float64 [N] in [0, 1] on the maps' device ("energy-based
    pointing game").

    Maps are used as given (non-negative, e.g. the engine's normalised maps); a pixel the box edge cuts counts
    with the covered fraction of its area, so float boxes are exact. An all-zero map puts no mass anywhere and
    scores 0, so a CAM that looks at nothing gets no credit (never NaN).
    """
    maps = _maps(cams)
    gt = _boxes(boxes, len(maps), maps.device)
    if bool((maps < 0).any()):
        raise ValueError("heatmap_ratio needs non-negative maps (mass); got negative values")
    return _heatmap_ratio(maps, gt)


def _heatmap_ratio(maps: Tensor, gt: Tensor) -> Tensor:
    """:func:`heatmap_ratio` of checked maps and boxes."""
    rows = _coverage(gt[:, 1], gt[:, 3], maps.shape[1])  # [N, H]
    cols = _coverage(gt[:, 0], gt[:, 2], maps.shape[2])  # [N, W]
    inside = (torch.bmm(rows[:, None, :], maps)[:, 0] * cols).sum(1)
    total = maps.sum((1, 2))
    return torch.where(total > 0, inside / total.where(total > 0, torch.ones_like(total)), torch.zeros_like(total))


def pointing_game(
    cams: ArrayLike, boxes: ArrayLike | None = None, parts: ArrayLike | None = None, radius: float = 15.0
) -> Tensor:
    """Does each map point at the object? float64 [N] on the maps' device: 1.0 hit, 0.0 miss, NaN when there is
    nothing to point at.

    Give ``boxes`` [N, 4] xywh (hit: the maximum lies in the box) or ``parts`` [N, P, 3] (x, y, visible), as the
    dataset gives them (hit: the maximum lies within ``radius`` px of a visible part, 15 px as in Zhang et al.,
    2016; NaN for an image without visible parts). A pixel's position is its centre. Ties: the map points at all
    its maximal pixels (those within ``PEAK_TOLERANCE`` of the map's range of its peak, so that rounding, e.g. of
    channels-last weights, never picks the peak) and hits only if every one of them qualifies, so the result never
    depends on scan order; a flat map (including all zeros) points nowhere and never hits.
    """
    maps = _maps(cams)
    if (boxes is None) == (parts is None):
        raise ValueError("pointing_game needs boxes or parts (exactly one of them)")
    gt = None if boxes is None else _boxes(boxes, len(maps), maps.device)
    return _pointing_game(maps, gt, parts, radius)


def _pointing_game(maps: Tensor, gt: Tensor | None, parts: ArrayLike | None, radius: float) -> Tensor:
    """:func:`pointing_game` of checked maps (and boxes ``gt``)."""
    peak, low = maps.amax((1, 2), keepdim=True), maps.amin((1, 2), keepdim=True)
    image, row, column = torch.nonzero(maps >= peak - PEAK_TOLERANCE * (peak - low), as_tuple=True)
    x, y = column.double() + 0.5, row.double() + 0.5  # the maximal pixels' centres: few per map
    n = len(maps)
    if gt is not None:
        box = gt[image]
        qualifies = (x >= box[:, 0]) & (x <= box[:, 0] + box[:, 2]) & (y >= box[:, 1]) & (y <= box[:, 1] + box[:, 3])
    else:
        assert parts is not None  # one of the two was given
        points = _float64(parts, "parts", maps.device)
        if points.ndim != 3 or points.shape[0] != n or points.shape[2] != 3 or not bool(torch.isfinite(points).all()):
            raise ValueError(
                f"parts must be finite [N, P, 3] (x, y, visible) with N = {n}, got shape {tuple(points.shape)}"
            )
        if not radius >= 0:
            raise ValueError(f"radius must be >= 0, got {radius}")
        visible = points[:, :, 2] > 0.5  # [N, P]
        distance = torch.hypot(x[:, None] - points[image, :, 0], y[:, None] - points[image, :, 1])  # [K, P]
        qualifies = (visible[image] & (distance <= radius)).any(1)
    misses = torch.bincount(image[~qualifies], minlength=n)
    hit = ((peak > low).flatten() & (misses == 0)).double()  # a flat map points nowhere
    if parts is not None:
        hit = torch.where(visible.any(1), hit, torch.full_like(hit, math.nan))
    return hit


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

    Args:
        num_slots: how many images the evaluated set has.
        device: where the rows live and the maps are scored (the maps' device: no host copy of them on an
            accelerator; the CPU for MPS, which has no float64).
        backend: the labeller, as :func:`box_hits` takes it; ``workers``: its threads on the CPU.
    """

    def __init__(
        self,
        num_slots: int,
        thresholds: ArrayLike | None = None,
        iou_thresholds: ArrayLike = DEFAULT_IOU_THRESHOLDS,
        workers: int = 1,
        radius: float = 15.0,
        device: torch.device | str = "cpu",
        backend: Backend = "auto",
    ):
        if not isinstance(num_slots, int) or num_slots < 0:
            raise ValueError(f"num_slots must be a non-negative integer, got {num_slots!r}")
        self.thresholds = _thresholds(thresholds)
        self.iou_thresholds = _iou_thresholds(iou_thresholds)
        self.workers, self.radius = workers, radius
        self.device = torch.device("cpu" if torch.device(device).type == "mps" else device)
        self.backend = backend
        labeller(self.device, backend)  # checks the name now, not at the first batch
        self.num_hits = len(self.thresholds) * len(self.iou_thresholds)
        # columns: hits | heatmap ratio | pointing game (box) | pointing game (parts) | has visible parts | count
        self.rows = torch.zeros(num_slots, self.num_hits + 5, dtype=torch.float64, device=self.device)

    def update(
        self,
        slots: ArrayLike,
        maps: ArrayLike,
        boxes: ArrayLike,
        parts: ArrayLike | None = None,
        hits: ArrayLike | None = None,
    ) -> None:
        """Add maps [B, H, W] of the images in ``slots`` [B] with their GT boxes [B, 4] (and parts [B, P, 3]);
        ``hits`` [B, T, I] when already known (a fixed baseline map's)."""
        index = torch.as_tensor(np.asarray(slots, dtype=np.int64), device=self.device)
        cams = _maps(_float64(maps, "cams", self.device), finite=False)  # a non-finite map is scored NaN below
        if index.shape != (len(cams),) or (len(index) and (index.min() < 0 or index.max() >= len(self.rows))):
            raise ValueError(f"slots must be [{len(cams)}] indices in [0, {len(self.rows)}), got {index.tolist()[:8]}")
        finite = torch.isfinite(cams).flatten(1).all(1)
        if not bool(finite.all()):  # a diverged model's maps: scored as NaN (compute then gives NaN), never as misses
            cams = torch.where(finite[:, None, None], cams, torch.zeros_like(cams))
        if bool((cams < 0).any()):
            raise ValueError("LocalizationAccumulator needs non-negative maps (mass); got negative values")
        gt = _boxes(boxes, len(cams), self.device)
        if hits is None:
            hits = _box_hits(cams, gt, self.thresholds, self.iou_thresholds, self.workers, self.backend)
        values = torch.zeros(len(cams), self.rows.shape[1], dtype=torch.float64, device=self.device)
        values[:, : self.num_hits] = torch.as_tensor(hits, device=self.device).reshape(len(cams), -1)
        values[:, self.num_hits] = _heatmap_ratio(cams, gt)
        values[:, self.num_hits + 1] = _pointing_game(cams, gt, None, self.radius)
        if parts is not None:
            pointed = _pointing_game(cams, None, parts, self.radius)
            known = ~torch.isnan(pointed)  # an image without visible parts has nothing to point at
            values[:, self.num_hits + 2] = torch.where(known, pointed, torch.zeros_like(pointed))
            values[:, self.num_hits + 3] = known.double()
        values[:, :-1] = torch.where(finite[:, None], values[:, :-1], torch.full_like(values[:, :-1], math.nan))
        values[:, -1] = 1.0
        self.rows.index_add_(0, index, values)

    def merge(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the rows over processes with ``reduce_sum`` (e.g. Lightning's ``strategy.reduce(t, "sum")``: one
        all-reduce of the rows where they are); afterwards every rank computes the same scores."""
        self.rows = reduce_sum(self.rows).to(self.device, torch.float64)

    @property
    def num_images(self) -> int:
        return int((self.rows[:, -1] > 0).sum())

    def compute(self, slots: ArrayLike | None = None) -> dict[str, float | np.ndarray]:
        """The scores over every slot seen at least once (each counted once), or over those of ``slots`` (e.g. one
        class's images); ValueError if none was seen."""
        seen = self.rows[:, -1] > 0
        if slots is not None:
            chosen = torch.zeros_like(seen)
            chosen[torch.as_tensor(np.asarray(slots, dtype=np.int64), device=self.device)] = True
            seen &= chosen
        if not seen.any():
            raise ValueError("no image was added to the localization accumulator")
        rows = (self.rows[seen] / self.rows[seen, -1:]).cpu().numpy()
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
        return _host(x)
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a tensor or an array of numbers, got {type(x).__name__}") from err


def _host(x: Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def _float64(x: ArrayLike, name: str, device: torch.device | None = None) -> Tensor:
    """``x`` as a float64 tensor on ``device`` (default: its own; the CPU for arrays, and for MPS, which has no
    float64)."""
    tensor = x.detach() if isinstance(x, Tensor) else torch.tensor(_numpy(x, name))
    device = tensor.device if device is None else device
    return tensor.to("cpu" if device.type == "mps" else device, torch.float64)


def _maps(cams: ArrayLike, finite: bool = True) -> Tensor:
    maps = _float64(cams, "cams")
    if maps.ndim != 3 or 0 in maps.shape[1:]:
        raise ValueError(f"cams must be [N, H, W] with H, W > 0, got shape {tuple(maps.shape)}")
    if finite and not bool(torch.isfinite(maps).all()):
        raise ValueError("cams contain NaN or infinite values")
    return maps


def _boxes(boxes: ArrayLike, n: int, device: torch.device | None = None) -> Tensor:
    gt = _float64(boxes, "boxes", device)
    if gt.shape != (n, 4):
        raise ValueError(f"boxes must be [N, 4] (x, y, w, h) with N = {n} (one per map), got shape {tuple(gt.shape)}")
    if not bool(torch.isfinite(gt).all()) or bool((gt[:, 2:] < 0).any()):
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


def _coverage(start: Tensor, length: Tensor, n: int) -> Tensor:
    """[N, n]: the fraction of each unit pixel interval [k, k + 1] inside [start, start + length]."""
    k = torch.arange(n, dtype=torch.float64, device=start.device)
    return (torch.minimum(k + 1, start[:, None] + length[:, None]) - torch.maximum(k, start[:, None])).clamp(0, 1)
