"""One panel bird as pixels: two cells side by side (its map and a second view), their boxes, W&B box groups.

A bird is shown as a strip of two cells so every W&B image of a panel has the same size (W&B draws a list of
differently sized images wrongly): the primary map, then the other class's map when it differs (classifier: true
vs predicted; embedding net: true class's proxy vs nearest proxy), the single-point neighbour with its own map, or
else the plain image. Pure NumPy/PIL/torch: nothing here knows Lightning or W&B objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from cubcam.cams.figure import as_uint8, cam_box, draw_boxes
from cubcam.cams.overlay import overlay

GAP = 4  # white pixels between the two cells of a strip


@dataclass
class Cell:
    """One image of a strip: the picture, its GT box and class, and optionally a CAM (its class: ``cam_class``)."""

    image: np.ndarray  # uint8 [H, W, 3]
    gt_box: Tensor | np.ndarray | None  # (x, y, w, h) in pixels
    gt_class: int
    cam: Tensor | None = None  # [H, W] in [0, 1]
    cam_class: int | None = None


@dataclass
class Strip:
    """A bird's cells side by side: ``pixels`` without boxes (W&B draws them), ``boxed`` with them (the PNG)."""

    pixels: np.ndarray
    boxed: np.ndarray
    gt_boxes: list[tuple[np.ndarray, int]] = field(default_factory=list)  # (x, y, w, h in strip pixels, class)
    cam_boxes: list[tuple[np.ndarray, int]] = field(default_factory=list)


def render_strip(cells: list[Cell], colormap: str, alpha: float, threshold: float) -> Strip:
    """Overlay each cell's CAM, box its largest region at ``threshold`` (see ``cubcam.cams.figure.cam_box``), join the
    cells left to right with a white gap; box coordinates are shifted into the strip."""
    plain, boxed, gt_boxes, cam_boxes = [], [], [], []
    left = 0
    for cell in cells:
        pixels = overlay(cell.image, cell.cam, colormap, alpha) if cell.cam is not None else as_uint8(cell.image)
        box = cam_box(cell.cam, threshold) if cell.cam is not None else None
        gt = None if cell.gt_box is None else np.asarray(cell.gt_box, dtype=np.float64).reshape(4)
        plain.append(pixels)
        boxed.append(draw_boxes(pixels, gt, box))
        shift = np.array([left, 0, 0, 0], dtype=np.float64)
        if gt is not None and gt[2] > 0 and gt[3] > 0:
            gt_boxes.append((gt + shift, cell.gt_class))
        if box is not None:
            cam_boxes.append((box + shift, cell.cam_class if cell.cam_class is not None else cell.gt_class))
        left += pixels.shape[1] + GAP
    return Strip(_join(plain), _join(boxed), gt_boxes, cam_boxes)


def wandb_boxes(strip: Strip, class_names: list[str]) -> dict[str, Any]:
    """W&B's native box groups of a strip: ``ground_truth`` (green in the PNG) and ``cam`` (red), each with the
    ``class_labels``; both groups are always present (possibly with no boxes), so the UI toggles stay put."""
    groups = {}
    for group, boxes in (("ground_truth", strip.gt_boxes), ("cam", strip.cam_boxes)):
        data = [{"position": {"minX": int(round(x)), "maxX": int(round(x + w)), "minY": int(round(y)),
                              "maxY": int(round(y + h))},
                 "domain": "pixel", "class_id": int(c), "box_caption": f"{group}: {name(class_names, c)}"}
                for (x, y, w, h), c in boxes]
        # All names, the same dict for every image: W&B keeps one class_labels table per key in the run config.
        labels = {c: name(class_names, c) for c in range(max([len(class_names)] + [int(c) + 1 for _, c in boxes]))}
        groups[group] = {"box_data": data, "class_labels": labels}
    return groups


def name(class_names: list[str], label: int) -> str:
    """A class's name, or ``class <n>`` where the list has none (a model trained without names)."""
    return class_names[label] if 0 <= label < len(class_names) else f"class {label}"


def _join(tiles: list[np.ndarray]) -> np.ndarray:
    height = max(t.shape[0] for t in tiles)
    parts = []
    for k, tile in enumerate(tiles):
        if k:
            parts.append(np.full((height, GAP, 3), 255, np.uint8))
        if tile.shape[0] < height:
            tile = np.concatenate([tile, np.full((height - tile.shape[0], tile.shape[1], 3), 255, np.uint8)])
        parts.append(tile)
    return np.concatenate(parts, axis=1)
