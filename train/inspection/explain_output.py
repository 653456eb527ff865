"""What ``cubcam explain`` writes beside its overlays: the grid pages, ``summary.json`` and the W&B run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torch import Tensor

from cubcam.cams.figure import grid, save_png, with_legend
from cubcam.cams.files import write_text

GRID_PAGE = 64  # tiles per grid file: a 500-image panel is 8 files of 16 x 4 tiles, not one 36,879 px tall image


class GridPages:
    """The captioned grid of every explained image, written a page (:data:`GRID_PAGE` tiles) at a time:
    ``grid.png`` when one page holds them all, else ``grid_1.png``, ``grid_2.png``, ... (zero-padded past 9 pages).
    GT box green (dataset images), the CAM's box red, as in the training callback's panels."""

    def __init__(self, out: Path, num_pages: int, colormap: str, alpha: float, legend: str = ""):
        self.out, self.colormap, self.alpha, self.legend = out, colormap, alpha, legend
        self.digits = len(str(num_pages)) if num_pages > 1 else 0
        self.pending: list[tuple[Any, str, Tensor, Tensor | None]] = []  # (pixels, caption, map, box) of the page
        self.written: list[str] = []

    def add(self, pixels: Any, text: str, cam: Tensor, box: Tensor | None) -> None:
        self.pending.append((pixels, text, cam, box))
        if len(self.pending) == GRID_PAGE:
            self._flush()

    def close(self) -> list[str]:
        """Write the last page; the names of all the pages written, in order."""
        self._flush()
        return self.written

    def _flush(self) -> None:
        if not self.pending:
            return
        name = f"grid_{len(self.written) + 1:0{self.digits}d}.png" if self.digits else "grid.png"
        tiles, captions, maps, boxes = zip(*self.pending)
        page = grid(tiles, captions, ncols=4, cams=maps, boxes=boxes, colormap=self.colormap, alpha=self.alpha)
        save_png(with_legend(page, self.legend) if self.legend else page, self.out / name)
        self.written.append(name)
        self.pending = []


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def log_to_wandb(args: argparse.Namespace, summary: dict[str, Any], images: list[Path], captions: list[str]) -> None:
    """One W&B run (``job_type=explain``, project ``--wandb``) with the grid and every overlay; WANDB_MODE=offline
    keeps it local."""
    import wandb  # only here: explaining without --wandb never starts it

    run = wandb.init(
        project=args.wandb,
        job_type="explain",
        dir=str(args.out),
        config={k: v for k, v in summary.items() if not isinstance(v, (list, dict))},
    )
    try:
        logged: dict[str, Any] = {
            "explain/overlays": [wandb.Image(str(p), caption=c) for p, c in zip(images, captions)]
        }
        if summary.get("grid"):
            logged["explain/grid"] = wandb.Image(str(args.out / summary["grid"]))
        run.log(logged)
        run_dir = Path(run.dir).parent
        print(f"W&B run: {run_dir}" + (f"   upload with: wandb sync {run_dir}" if run.offline else ""))
    finally:
        run.finish()
