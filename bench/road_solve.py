"""ROAD's imputation: the batched conjugate-gradient solve (``solver="iterative"``, on ``--device``) against SciPy's
direct sparse solve (``solver="direct"``, the CPU, image by image), in one run, on the same maps and images.

Each image is imputed at every ROAD percentile in both orders (MoRF and LeRF), as ``cubcam evaluate --faithfulness``
does; the removed regions are CAM-like blobs (a 7x7 grid upsampled). The two fills are checked equal to 1e-5.

    python bench/road_solve.py [--images 16] [--sizes 128 224] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cubcam.cams.road import ROAD_PERCENTILES, Solver, impute, kept_pixels


def imputations(images: torch.Tensor, cams: torch.Tensor, solver: Solver) -> tuple[float, list[torch.Tensor]]:
    start, filled = time.perf_counter(), []
    for order in (1 - cams, cams):
        for percentile in ROAD_PERCENTILES:
            filled.append(impute(images, kept_pixels(order, percentile), torch.Generator(), 0.0, solver).cpu())
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, filled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--device", default="cpu", help="where the iterative solve runs")
    args = parser.parse_args()
    for size in args.sizes:
        g = torch.Generator().manual_seed(size)
        images = torch.rand(args.images, 3, size, size, generator=g)
        coarse = torch.rand(args.images, 1, 7, 7, generator=g)
        cams = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        direct, expected = imputations(images, cams, "direct")
        imputations(images[:2].to(args.device), cams[:2].to(args.device), "iterative")  # warm-up
        iterative, found = imputations(images.to(args.device), cams.to(args.device), "iterative")
        worst = max(float((a - b).abs().max()) for a, b in zip(found, expected))
        if worst > 1e-5:
            raise SystemExit(f"{size} px: the iterative fill differs from the direct one by {worst:.2e}")
        per = 2 * len(ROAD_PERCENTILES) * args.images
        print(
            f"{size} px, {per} imputations: direct (SciPy, CPU) {1000 * direct / per:6.1f} ms each | iterative on "
            f"{args.device} {1000 * iterative / per:6.1f} ms each ({direct / iterative:.2f}x the direct speed; "
            f"largest difference {worst:.1e})",
            flush=True,
        )


if __name__ == "__main__":
    main()
