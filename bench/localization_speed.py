"""MaxBoxAccV2's cost per map: ``cubcam.cams.localization.box_hits`` against labelling each threshold on its own,
in one run.

The baseline is the reference's procedure (Choe et al., CVPR 2020) with ``scipy.ndimage`` in place of OpenCV: at each
of the 100 thresholds, label the 8-connected regions and the holes (4-connected, not touching the border) of the
8-bit map and take their boxes. ``box_hits`` labels all thresholds in one pass, stacks small maps and, with
``workers`` > 1, spreads large maps (224 px and up) over threads. All three must give the same hits (checked here).

Maps are CAM-like: ReLU of a Gaussian grid (7x7 / 14x14 at 224 px, as ResNet at output stride 32 / 16), upsampled
bilinearly to the image.

    python bench/localization_speed.py [--maps 32] [--workers N]

Target: box_hits >= 5x faster than the per-threshold baseline. The threads' gain is reported: it depends on the cores,
and the interpreter's share of the work (about half at 224 px) bounds it.
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

from cubcam.cams.localization import DEFAULT_IOU_THRESHOLDS, DEFAULT_THRESHOLDS, box_hits, box_iou

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
        best = box_iou(np.array(boxes, dtype=np.float64).reshape(-1, 4), gt[None]).max(initial=0.0)
        hits[t] = best >= np.asarray(DEFAULT_IOU_THRESHOLDS)
    return hits


def cam_like(count: int, size: int, grid: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.relu(torch.randn(count, 1, grid, grid, generator=g) + 0.3)
    maps = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    xy = torch.rand(count, 2, generator=g) * size * 0.4
    wh = (torch.rand(count, 2, generator=g) * 0.4 + 0.2) * size
    return maps, torch.cat([xy, wh], 1)


def best_of(repeats: int, call: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
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
    args = parser.parse_args()
    print(f"{args.maps} maps per scenario, {os.cpu_count()} CPUs, box_hits workers {args.workers}; ms per map")
    for size, grid in SCENARIOS:
        maps, boxes = cam_like(args.maps, size, grid)
        start = time.perf_counter()
        reference = np.stack([per_threshold_hits(m, b) for m, b in zip(maps.double().numpy(), boxes.double().numpy())])
        per_threshold = time.perf_counter() - start
        serial, hits = best_of(args.repeats, lambda: box_hits(maps, boxes))
        threaded, threaded_hits = best_of(args.repeats, lambda: box_hits(maps, boxes, workers=args.workers))
        if not (np.array_equal(hits, reference) and np.array_equal(threaded_hits, reference)):
            raise SystemExit(f"{size} px: box_hits differs from the per-threshold baseline")
        ms = {
            name: 1000 * seconds / args.maps
            for name, seconds in (("per-threshold", per_threshold), ("box_hits", serial), ("threads", threaded))
        }
        print(
            f"{size} px, {grid}x{grid} grid: per-threshold {ms['per-threshold']:6.2f} | box_hits "
            f"{ms['box_hits']:5.2f} ({per_threshold / serial:4.1f}x) | {args.workers} workers {ms['threads']:5.2f} "
            f"({serial / threaded:.2f}x of one)",
            flush=True,
        )


if __name__ == "__main__":
    main()
