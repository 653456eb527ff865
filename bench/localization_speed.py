"""MaxBoxAccV2's cost per map: ``cubcam.cams.localization.box_hits`` against labelling each threshold on its own,
in one run.

The baseline is the reference's procedure (Choe et al., CVPR 2020) with ``scipy.ndimage`` in place of OpenCV: at each
of the 100 thresholds, label the 8-connected regions and the holes (4-connected, not touching the border) of the
8-bit map and take their boxes. ``box_hits`` labels all thresholds in one pass, stacks small maps and, with
``workers`` > 1, spreads large maps (224 px and up) over threads. All three must give the same hits (checked here).

Maps are CAM-like: ReLU of a Gaussian grid (7x7 / 14x14 at 224 px, as ResNet at output stride 32 / 16), upsampled
bilinearly to the image.

    python bench/localization_speed.py [--maps 32] [--workers N] [--device cuda]

Targets: box_hits >= 5x faster than the per-threshold baseline; the CPU default (``backend="auto"``: NumPy) no slower
than the NumPy labeller called directly. The threads' gain is reported: it depends on the cores, and the
interpreter's share of the work (about half at 224 px) bounds it. The torch labeller (``backend="torch"``) is timed
on ``--device`` with its passes, union-find rounds, runs and host syncs, and for the callback's 512 maps at 224 px its
ops and bytes are counted (every aten op, as dispatched) for a projection of its time on a GPU: ops x launch cost +
bytes / memory bandwidth + syncs x sync cost (the assumptions are printed). Target on a GPU: <= 45 ms for 512 maps.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils._python_dispatch import TorchDispatchMode

from cubcam.cams.level_sets import LabelStats, level_set_hits
from cubcam.cams.localization import (
    DEFAULT_IOU_THRESHOLDS,
    DEFAULT_THRESHOLDS,
    _numpy_box_hits,
    box_hits,
    box_iou,
)

# A GPU's costs for the projection (H100 SXM figures): a kernel launch, an effective bandwidth for these gathers and
# scatters (a third of HBM3's 3.35 TB/s: random int64 accesses), a host sync.
LAUNCH_S, BANDWIDTH_BPS, SYNC_S = 6e-6, 1.1e12, 25e-6

SCENARIOS = ((64, 4), (128, 8), (224, 7), (224, 14))  # (image px, CAM grid)


def per_threshold_hits(cam: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """The baseline: bool [T, I] for one map, one labelling per threshold."""
    span = cam.max() - cam.min()
    q = ((cam - cam.min()) / span * 255).astype(np.uint8) if span > 0 else np.zeros(cam.shape, np.uint8)
    height, width = q.shape
    hits = np.zeros((len(DEFAULT_THRESHOLDS), len(DEFAULT_IOU_THRESHOLDS)), bool)
    for t, threshold in enumerate(DEFAULT_THRESHOLDS):
        on = q > int(threshold * q.max())
        boxes = []
        regions, _ = ndimage.label(on, structure=np.ones((3, 3)))
        for rows, cols in ndimage.find_objects(regions):
            boxes.append((cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start))
        holes, _ = ndimage.label(~on)
        for rows, cols in ndimage.find_objects(holes):
            if rows.start > 0 and cols.start > 0 and rows.stop < height and cols.stop < width:
                boxes.append((cols.start - 1, rows.start - 1, cols.stop - cols.start + 2, rows.stop - rows.start + 2))
        best = box_iou(np.array(boxes, dtype=np.float64).reshape(-1, 4), gt[None]).numpy().max(initial=0.0)
        hits[t] = best >= np.asarray(DEFAULT_IOU_THRESHOLDS)
    return hits


def cam_like(count: int, size: int, grid: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.relu(torch.randn(count, 1, grid, grid, generator=g) + 0.3)
    maps = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    xy = torch.rand(count, 2, generator=g) * size * 0.4
    wh = (torch.rand(count, 2, generator=g) * 0.4 + 0.2) * size
    return maps, torch.cat([xy, wh], 1)


ALIASES = {"view", "_unsafe_view", "slice", "select", "expand", "alias", "t", "transpose", "permute", "unsqueeze"}
ALIASES |= {"squeeze", "as_strided", "detach", "flip_view", "lift_fresh", "_to_copy_view"}
FACTORIES = {"new_zeros", "new_full", "new_empty", "zeros", "zeros_like", "full", "full_like", "arange", "empty"}
FACTORIES |= {"empty_like", "ones_like", "fill_", "zero_"}


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched and the bytes of the tensors it reads and writes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        tensors = [a for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)]
        outputs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        name = func.__name__.split(".")[0]
        if name in ALIASES:  # a view: no data moves
            moved = 0
        elif name in FACTORIES:  # writes its output only
            moved = sum(o.nbytes for o in outputs)
        elif name.startswith(("index_select", "gather")):  # reads the index and as many source elements
            moved = tensors[1].nbytes + 2 * sum(o.nbytes for o in outputs)
        elif name.startswith("scatter"):  # reads the index and the source, updates as many elements in place
            moved = tensors[1].nbytes + 3 * tensors[2].nbytes if len(tensors) > 2 else 2 * tensors[1].nbytes
        else:  # reads every input, writes every output (an in-place op's self once)
            moved = sum(t.nbytes for t in tensors) + sum(o.nbytes for o in outputs if o is not args[0])
        self.bytes += moved
        return out


def torch_labeller(maps: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, LabelStats]:
    stats = LabelStats()
    thresholds, ious = torch.as_tensor(DEFAULT_THRESHOLDS), torch.as_tensor(DEFAULT_IOU_THRESHOLDS)
    hits = level_set_hits(maps, boxes, thresholds, ious, stats)
    if maps.device.type == "cuda":
        torch.cuda.synchronize()
    return hits, stats


def projection(device: str) -> None:
    """The callback's 512 maps at 224 px: the torch labeller's ops, bytes and syncs, and its projected GPU time."""
    maps, boxes = cam_like(512, 224, 7, seed=1)
    maps, boxes = maps.to(device), boxes.to(device)
    with OpCounter() as counter:
        _, stats = torch_labeller(maps, boxes)
    projected = counter.ops * LAUNCH_S + counter.bytes / BANDWIDTH_BPS + stats.syncs * SYNC_S
    print(
        f"512 maps at 224 px (7x7 grid), torch labeller: {stats.passes} passes, {stats.runs:,} runs, "
        f"{stats.rounds} union-find rounds, {stats.syncs} host syncs, {counter.ops:,} ops, "
        f"{counter.bytes / 1e9:.2f} GB moved -> projected {1000 * projected:.0f} ms on a GPU "
        f"({LAUNCH_S * 1e6:.0f} us a launch, {BANDWIDTH_BPS / 1e12:.1f} TB/s, {SYNC_S * 1e6:.0f} us a sync; "
        "target 45 ms)"
    )
    if device == "cuda":
        seconds, _ = best_of(3, lambda: torch_labeller(maps, boxes)[0])
        print(f"512 maps at 224 px on {torch.cuda.get_device_name()}: measured {1000 * seconds:.1f} ms (target 45 ms)")


def best_of(repeats: int, call: Callable[[], object]) -> tuple[float, object]:
    """The fastest of ``repeats`` timed calls after one untimed warm-up, and the result."""
    call()
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=32, help="maps per scenario")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads for box_hits")
    parser.add_argument("--repeats", type=int, default=3, help="box_hits runs per scenario (the best counts)")
    parser.add_argument("--device", default="cpu", help="where the torch labeller runs (cpu, cuda)")
    args = parser.parse_args()
    print(f"{args.maps} maps per scenario, {os.cpu_count()} CPUs, box_hits workers {args.workers}; ms per map")
    thresholds, ious = DEFAULT_THRESHOLDS, np.asarray(DEFAULT_IOU_THRESHOLDS)
    for size, grid in SCENARIOS:
        maps, boxes = cam_like(args.maps, size, grid)
        start = time.perf_counter()
        reference = np.stack([per_threshold_hits(m, b) for m, b in zip(maps.double().numpy(), boxes.double().numpy())])
        per_threshold = time.perf_counter() - start
        host, gt = maps.double().numpy(), boxes.double().numpy()
        direct, _ = best_of(args.repeats, lambda: _numpy_box_hits(host, gt, thresholds, ious, 1))
        serial, hits = best_of(args.repeats, lambda: box_hits(maps, boxes))
        threaded, threaded_hits = best_of(args.repeats, lambda: box_hits(maps, boxes, workers=args.workers))
        on_device, boxes_there = maps.to(args.device), boxes.to(args.device)
        in_torch, (torch_hits, stats) = best_of(args.repeats, lambda: torch_labeller(on_device, boxes_there))
        for name, result in (("box_hits", hits), ("threads", threaded_hits), ("torch", torch_hits.cpu())):
            if not np.array_equal(np.asarray(result), reference):
                raise SystemExit(f"{size} px: {name} differs from the per-threshold baseline")
        ms = {
            name: 1000 * seconds / args.maps
            for name, seconds in (
                ("per-threshold", per_threshold),
                ("numpy", direct),
                ("box_hits", serial),
                ("threads", threaded),
                ("torch", in_torch),
            )
        }
        print(
            f"{size} px, {grid}x{grid} grid: per-threshold {ms['per-threshold']:6.2f} | box_hits "
            f"{ms['box_hits']:5.2f} ({per_threshold / serial:4.1f}x; {direct / serial:.2f}x of the NumPy labeller "
            f"called directly) | {args.workers} workers {ms['threads']:5.2f} ({serial / threaded:.2f}x of one) | "
            f"torch on {args.device} {ms['torch']:5.2f} ({stats.passes} pass, {stats.rounds} rounds, "
            f"{stats.runs:,} runs, {stats.syncs} syncs)",
            flush=True,
        )
    projection(args.device)


if __name__ == "__main__":
    main()
