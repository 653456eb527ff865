"""MaxBoxAccV2's region boxes in torch, on the maps' device: the NumPy labeller of ``localization`` ported op for op.

    hits = level_set_hits(maps, boxes, thresholds, ious)   # bool [N, T, I] on maps.device

Each map is quantised as the reference does (float64), every pixel gets its *depth* (how many of the map's distinct
cuts lie below it), and each level set ``depth >= i`` is cut into horizontal runs: their number is the maps' total
variation, not levels x pixels. Runs of one level in neighbouring rows that touch are linked, and a union-find
labels all levels of all maps at once: hooking onto grandparents and shortcutting (FastSV, Zhang et al., 2020),
so the rounds grow with the log of the runs; every ``CHECK_EVERY`` rounds the graph is contracted to the edges
still unresolved (one host sync).
Holes are the 4-connected components of the off-set that do not touch the border, labelled the same way.

Only ops with a deterministic CUDA kernel are used (sort, searchsorted, gather, ``scatter_reduce`` with amin/amax,
integer ``cumsum`` and ``bincount`` without weights), so the hits are bit-identical under
``torch.use_deterministic_algorithms(True)``; float64 throughout, as the reference quantises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

RUN_BUDGET = 4_000_000  # runs labelled in one pass: ~200 bytes each (keys, edges, labels), so a pass stays near 1 GB
PIXEL_BUDGET = 1 << 24  # pixels quantised at once (float64 maps, int32 depths): 512 maps of 224 px in 2 chunks
CHECK_EVERY = 2  # union-find rounds between convergence checks (each check is a host sync)


@dataclass
class LabelStats:
    """What one :func:`level_set_hits` call did: passes over the maps, union-find rounds, runs and host syncs."""

    passes: int = 0
    rounds: int = 0
    runs: int = 0
    syncs: int = 0


def level_set_hits(
    maps: Tensor, boxes: Tensor, thresholds: Tensor, ious: Tensor, stats: LabelStats | None = None
) -> Tensor:
    """Per map, threshold and IoU threshold: does a region or hole box of the level set reach that IoU with the GT
    box? ``maps`` [N, H, W], ``boxes`` [N, 4] xywh, ``thresholds`` [T], ``ious`` [I] -> bool [N, T, I], on
    ``maps.device`` (the same hits as the NumPy labeller, ``localization._numpy_box_hits``)."""
    stats = stats if stats is not None else LabelStats()
    device = maps.device
    count, height, width = maps.shape
    thresholds = thresholds.to(device, torch.float64)
    ious = ious.to(device, torch.float64)
    hits = torch.zeros(count, len(thresholds), len(ious), dtype=torch.bool, device=device)
    step = max(1, PIXEL_BUDGET // (height * width))
    for first in range(0, count, step):
        depth, level_of = depths(quantize(maps[first : first + step]), thresholds)
        runs = _runs_per_map(depth).cumsum(0).tolist()  # one sync: where to cut the maps into passes
        stats.syncs += 1
        start = 0
        while start < len(depth):
            stop = start + 1  # at least one map a pass, however many runs it has
            while stop < len(depth) and runs[stop] - (runs[start - 1] if start else 0) <= RUN_BUDGET:
                stop += 1
            gt = boxes[first + start : first + stop].to(device, torch.float64)
            image, level, regions = region_boxes(depth[start:stop], stats)
            best = torch.zeros((stop - start) * len(thresholds), dtype=torch.float64, device=device)
            best.scatter_reduce_(0, image * len(thresholds) + level, box_iou(regions.double(), gt[image]), "amax")
            best = best.view(stop - start, len(thresholds)).gather(1, level_of[start:stop])
            hits[first + start : first + stop] = best[:, :, None] >= ious
            stats.passes += 1
            start = stop
    return hits


def quantize(maps: Tensor) -> Tensor:
    """The reference's 8-bit score maps (int64 [N, H, W] in 0..255) of min-max normalised maps, in float64."""
    maps = maps.to(torch.float64)
    low, high = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    span = torch.where(high > low, high - low, torch.ones_like(high))  # a flat map quantises to 0
    return ((maps - low) / span * 255).long()  # truncation, as NumPy's astype(uint8) of values in [0, 255]


def depths(q: Tensor, thresholds: Tensor) -> tuple[Tensor, Tensor]:
    """Each pixel's count of the map's distinct cuts below it, int32 [N, H, W], and each threshold's cut index
    [N, T]: a pixel is on at cut index j iff its depth > j (the cut of a threshold is ``int(threshold * max)``)."""
    count = len(q)
    cuts = (thresholds[None, :] * q.amax((1, 2))[:, None].double()).long()  # [N, T] in 0..255
    present = torch.zeros(count, 256, dtype=torch.long, device=q.device).scatter_(1, cuts, 1)
    below = present.cumsum(1) - present  # [N, v]: distinct cuts < v
    return below.gather(1, q.reshape(count, -1)).view(q.shape).int(), below.gather(1, cuts)


def region_boxes(depth: Tensor, stats: LabelStats) -> tuple[Tensor, Tensor, Tensor]:
    """All region and hole boxes of ``depth > j`` for every cut index j of every map [N, H, W]: (map [R], j [R],
    xywh int64 [R, 4]). The holes' pass runs only over the cuts that have one (components > Euler number)."""
    count, height, width = depth.shape
    top = int(depth.max()) if depth.numel() else 0
    stats.syncs += 1
    empty = depth.new_zeros(0, dtype=torch.long)
    if top == 0:
        return empty, empty, depth.new_zeros(0, 4, dtype=torch.long)
    image, level, x0, y0, x1, y1, euler = level_set_components(depth, True, top, stats)
    components = torch.bincount(image * (top + 1) + level, minlength=count * (top + 1)).view(count, top + 1)
    images, levels, boxes = [image], [level - 1], [torch.stack([x0, y0, x1 - x0, y1 - y0], 1)]
    has_hole = components[:, 1:] > euler[:, 1:]  # [N, j]
    n, j = torch.nonzero(has_hole, as_tuple=True)
    stats.syncs += 1
    if len(n):
        # At cut j a pixel is off iff depth <= j. Count the hole cuts at or above each pixel's depth: level l of
        # that count is the off-set at the map's l-th highest hole cut.
        above = torch.cat([has_hole.int().flip(1).cumsum(1, dtype=torch.int32).flip(1), depth.new_zeros(count, 1)], 1)
        off_count = above.gather(1, depth.reshape(count, -1).long()).view(depth.shape)
        off_top = int(above.max())
        stats.syncs += 1
        cut_of = depth.new_zeros(count, off_top + 1, dtype=torch.long)
        cut_of[n, above[n, j].long()] = j  # distinct hole cuts of a map have distinct counts
        image, level, x0, y0, x1, y1, _ = level_set_components(off_count, False, off_top, stats)
        inner = (x0 > 0) & (y0 > 0) & (x1 < width) & (y1 < height)  # touching the border: outside, not a hole
        image, level, x0, y0, x1, y1 = (v[inner] for v in (image, level, x0, y0, x1, y1))
        images.append(image)
        levels.append(cut_of[image, level])
        boxes.append(torch.stack([x0 - 1, y0 - 1, x1 - x0 + 2, y1 - y0 + 2], 1))  # the contour around the hole
    return torch.cat(images), torch.cat(levels), torch.cat(boxes)


def level_set_components(depth: Tensor, eight: bool, top: int, stats: LabelStats) -> tuple[Tensor, ...]:
    """Bounding boxes of the connected components (8- or 4-connected) of ``depth >= i`` for every level
    i = 1 .. ``top`` of every map [N, H, W]: (map, level, x0, y0, x1, y1) per component (x1, y1 exclusive) and the
    Euler number (components - holes) of every map's every level, [N, top + 1] (runs minus linked pairs).

    The maps are stacked into one tall image with an empty row below each and an empty column on either side, so
    no region crosses into the next map; runs start where a row steps up through a level and end where it steps
    down, and are ordered by (level, row, column), so the runs a run touches in the row below form one slice.
    Run arrays are int32 (int64 only where torch indexes with them): they are most of the bytes moved.
    """
    maps, rows, width = depth.shape[0], depth.shape[1] + 1, depth.shape[2]
    height = maps * rows
    padded = depth.new_zeros(maps, rows, width + 2, dtype=torch.int32)
    padded[:, :-1, 1:-1] = depth
    padded = padded.view(height, width + 2)
    left, right = padded[:, :-1].reshape(-1), padded[:, 1:].reshape(-1)  # the two sides of every column boundary
    level, row, start = _crossings(left, right, width + 1, stats)  # a run of level i starts where left < i <= right
    _, _, end = _crossings(right, left, width + 1, stats)  # and ends (exclusive) where right < i <= left
    wide = (top + 1) * (height + 1) * (width + 1) >= 2**31  # the sort keys outgrow int32
    key = (level.long() if wide else level) * (height + 1) + row
    key = key * (width + 1)
    below = key + width + 1
    # Touching runs in the row below: 8-connected if they overlap after growing by one pixel, 4-connected if they
    # overlap.
    first = torch.searchsorted(key + end, below + start, side="left" if eight else "right", out_int32=True)
    last = torch.searchsorted(key + start, below + end, side="right" if eight else "left", out_int32=True)
    partners = (last - first).clamp(min=0)
    owner, partner = _expand(first, partners, stats)
    label = _union_find(len(key), owner, partner.long(), stats)
    stats.runs += len(key)
    roots = torch.nonzero(label == torch.arange(len(label), device=label.device)).flatten()
    stats.syncs += 1
    x0 = torch.full_like(start, width).scatter_reduce_(0, label, start, "amin").index_select(0, roots)
    y0 = torch.full_like(row, height).scatter_reduce_(0, label, row, "amin").index_select(0, roots)
    x1 = torch.zeros_like(end).scatter_reduce_(0, label, end, "amax").index_select(0, roots)
    y1 = torch.zeros_like(row).scatter_reduce_(0, label, row + 1, "amax").index_select(0, roots)
    slot = torch.div(row, rows, rounding_mode="floor") * (top + 1) + level
    links = torch.bincount(slot.index_select(0, owner), minlength=maps * (top + 1))
    euler = torch.bincount(slot, minlength=maps * (top + 1)) - links
    image = torch.div(y0, rows, rounding_mode="floor")
    boxes = (x0, y0 - image * rows, x1, y1 - image * rows)
    return (image.long(), level.index_select(0, roots).long(), *(b.long() for b in boxes), euler.view(maps, top + 1))


def _union_find(count: int, owner: Tensor, partner: Tensor, stats: LabelStats) -> Tensor:
    """The component of each of ``count`` nodes (the root of its final star: one label per component) under the
    undirected edges ``owner`` - ``partner``: FastSV's stochastic and aggressive hooking onto grandparents, then
    shortcutting. Every ``CHECK_EVERY`` rounds the forest is shortcut to stars and the graph contracted: each edge
    moves to its ends' roots and those inside one star are dropped (contraction keeps the components), so later
    rounds touch only the edges still unresolved; done when none is left."""
    parent = torch.arange(count, device=owner.device)
    u, v = torch.cat([owner, partner]), torch.cat([partner, owner])
    while len(u):
        grand = parent.index_select(0, parent)
        for _ in range(CHECK_EVERY):
            hook = grand.index_select(0, v)
            parent.scatter_reduce_(0, parent.index_select(0, u), hook, "amin")
            parent.scatter_reduce_(0, u, hook, "amin")
            parent = torch.minimum(parent, grand)
            grand = parent.index_select(0, parent)
        stats.rounds += CHECK_EVERY
        parent = _stars(parent, grand, stats)
        u, v = parent.index_select(0, u), parent.index_select(0, v)
        apart = torch.nonzero(u != v).flatten()
        stats.syncs += 1
        u, v = u.index_select(0, apart), v.index_select(0, apart)
    return parent


def _stars(parent: Tensor, grand: Tensor, stats: LabelStats) -> Tensor:
    """``parent`` shortcut until every node points at a root (pointer jumping; ``grand`` is ``parent[parent]``)."""
    while True:
        stats.syncs += 1
        if not bool((parent != grand).any()):
            return parent
        parent, grand = grand, grand.index_select(0, grand)


def _runs_per_map(depth: Tensor) -> Tensor:
    """How many runs each map's level sets have [N]: the upward steps along its rows, from 0 at the left edge."""
    steps = torch.diff(depth, dim=2, prepend=depth.new_zeros(*depth.shape[:2], 1))
    return steps.clamp(min=0).sum((1, 2))


def _crossings(low: Tensor, high: Tensor, width: int, stats: LabelStats) -> tuple[Tensor, Tensor, Tensor]:
    """Every (level, row, column) with low < level <= high at a boundary, sorted by (level, row, column): int32."""
    where = torch.nonzero(high > low).flatten()
    stats.syncs += 1
    low, high = low.index_select(0, where), high.index_select(0, where)
    boundary, level = _expand(low + 1, high - low, stats)
    level, order = torch.sort(level, stable=True)  # boundaries already run row-major
    position = where.index_select(0, boundary.index_select(0, order))
    row = torch.div(position, width, rounding_mode="floor")
    return level, row.int(), (position - row * width).int()


def _expand(starts: Tensor, counts: Tensor, stats: LabelStats) -> tuple[Tensor, Tensor]:
    """The ranges [starts[k], starts[k] + counts[k]) concatenated (``starts``' dtype), with k (int64) for each
    element."""
    total = int(counts.sum()) if counts.numel() else 0
    stats.syncs += 1
    owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts, output_size=total)
    offsets = starts - (counts.cumsum(0, dtype=starts.dtype) - counts)
    values = torch.arange(total, device=counts.device, dtype=starts.dtype)
    return owner, values + offsets.index_select(0, owner)


def box_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """IoU of xywh boxes, broadcast over leading dimensions ([..., 4] with [..., 4]); 0 where both are empty."""
    a, b = boxes_a, boxes_b
    iw = (torch.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(0)
    ih = (torch.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(0)
    inter = iw * ih
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return torch.where(union > 0, inter / union.where(union > 0, torch.ones_like(union)), torch.zeros_like(union))
