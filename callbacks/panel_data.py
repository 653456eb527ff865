"""The panel as data: what rendering (``panel_render.py``) produces and the evolution and the sinks consume.

Nothing here knows Lightning, W&B or how a map is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TypedDict

import numpy as np

from cubcam.cams.figure import Strip, placed_grid, png_bytes, with_legend

PANEL_COLUMNS = 4  # strips per row of the grid


class BirdRow(TypedDict):
    """One panel bird's numbers, for the per-epoch table (W&B ``val/cam_table``): how its primary map localizes."""

    index: int  # dataset index
    true: str
    predicted: str  # the predicted class (embedding nets: the nearest proxy's; nearest image: the neighbour's)
    score: float  # its probability or cosine
    # None where the bird has no GT box (the data has none): an empty table cell, not a 0.0 or False.
    cam_box_iou: float | None  # IoU of the primary map's CAM box with the GT box (0 when the map has no box)
    heatmap_ratio: float | None  # share of the primary map's mass inside the GT box
    peak_in_box: bool | None  # the primary map's peak lies inside the GT box
    # The same of its Finer-CAM map; None where it has none (CAMPanel(finer="wrong"): a bird the model gets right).
    finer_heatmap_ratio: float | None
    finer_peak_in_box: bool | None


@dataclass
class Panel:
    """One epoch's panel: a strip, a caption and a row of numbers per bird (in panel order), the class names."""

    epoch: int
    indices: list[int]
    strips: list[Strip]
    captions: list[str]
    class_names: list[str]
    rows: list[BirdRow]
    legend: str = ""  # what the cells and colours mean, above the PNG grid (W&B's panel has its box legend)

    @cached_property
    def _placed(self) -> tuple[np.ndarray, list[tuple[int, int]]]:
        return placed_grid([s.pixels for s in self.strips], self.captions, ncols=PANEL_COLUMNS)

    @property
    def plain_grid(self) -> np.ndarray:
        """Every strip without boxes, captioned, ``PANEL_COLUMNS`` a row (W&B draws the boxes itself)."""
        return self._placed[0]

    @property
    def origins(self) -> list[tuple[int, int]]:
        """Where each strip sits in the grids, (left, top)."""
        return self._placed[1]

    @cached_property
    def grid(self) -> np.ndarray:
        """The PNG grid: :attr:`plain_grid` with each strip's boxes drawn in, under its :attr:`legend` (the file and
        TensorBoard)."""
        boxed = self.plain_grid.copy()
        for strip, (left, top) in zip(self.strips, self.origins):
            height, width = strip.boxed.shape[:2]
            boxed[top : top + height, left : left + width] = strip.boxed
        return with_legend(boxed, self.legend) if self.legend else boxed

    @cached_property
    def grid_png(self) -> bytes:
        """The grid encoded as PNG once."""
        return png_bytes(self.grid)


def name(class_names: list[str], label: int) -> str:
    """A class's name, or ``class <n>`` where the list has none (a model trained without names)."""
    return class_names[label] if 0 <= label < len(class_names) else f"class {label}"
