"""Rendering: the panel as pixels. A bird is two cells side by side (its map and a second view), with boxes.

A bird is shown as a strip of two cells so every W&B image of a panel has the same size (W&B draws a list of
differently sized images wrongly): the primary map, then the other class's map when it differs (classifier: true
vs predicted; embedding net: true class's proxy vs nearest proxy), the single-point neighbour with its own map, or
else the plain image. Nothing here knows Lightning or W&B objects: the sinks (``sinks.py``) take a :class:`Panel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cubcam.callbacks.measure import EpochTarget
from cubcam.cams.figure import as_uint8, cam_box, draw_boxes, grid, png_bytes
from cubcam.cams.localization import box_iou, heatmap_ratio, pointing_game
from cubcam.cams.overlay import overlay
from cubcam.cams.protocol import CAMModule, Choice
from cubcam.cams.targets import Proxies

GAP = 4  # white pixels between the two cells of a strip
PANEL_COLUMNS = 4  # strips per row of the grid


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


class BirdRow(TypedDict):
    """One panel bird's numbers, for the per-epoch table (W&B ``val/cam_table``): how its primary map localizes."""

    index: int  # dataset index
    true: str
    predicted: str  # the predicted class (embedding nets: the nearest proxy's; single point: the neighbour's)
    score: float  # its probability or cosine
    cam_box_iou: float  # IoU of the primary map's CAM box with the GT box (0 without a box)
    heatmap_ratio: float  # share of the primary map's mass inside the GT box
    peak_in_box: bool  # the primary map's peak lies inside the GT box


@dataclass
class Panel:
    """One epoch's panel: a strip, a caption and a row of numbers per bird (in panel order), the class names."""

    epoch: int
    indices: list[int]
    strips: list[Strip]
    captions: list[str]
    class_names: list[str]
    rows: list[BirdRow]
    cell_width: int  # of one cell of a strip: the primary map is ``strip.boxed[:, :cell_width]``

    def primary_cells(self) -> list[np.ndarray]:
        """Each bird's primary map with its boxes, as drawn in the PNG: what the CAM evolution shows."""
        return [strip.boxed[:, : self.cell_width] for strip in self.strips]

    @cached_property
    def grid(self) -> np.ndarray:
        """The PNG grid: every strip with its boxes drawn, captioned, ``PANEL_COLUMNS`` a row (made once, for the
        file and for TensorBoard)."""
        return grid([s.boxed for s in self.strips], self.captions, ncols=PANEL_COLUMNS)

    @cached_property
    def grid_png(self) -> bytes:
        """The grid encoded as PNG once, for the file and for TensorBoard."""
        return png_bytes(self.grid)


@dataclass
class Style:
    colormap: str = "jet"
    alpha: float = 0.5
    box_threshold: float = 0.5  # where the CAM box is cut: MaxBoxAcc's best IoU-0.5 threshold once measured


def class_panel(
    module: CAMModule,
    birds: dict[str, Any],
    target: EpochTarget,
    choice: Choice,
    epoch: int,
    names: list[str],
    style: Style,
) -> Panel:
    """Each bird's map for the ``choice`` class, then for the other one (true vs predicted) where they differ,
    else the plain image: GradCAM of the class logit, or EmbeddingCAM of the class proxy (predicted: nearest)."""
    scores = target.target.class_scores(birds["output"]).cpu()
    labels, predicted = birds["label"].cpu(), scores.argmax(1)
    primary, other = (labels, predicted) if choice == "true" else (predicted, labels)
    size = tuple(birds["image"].shape[-2:])
    device = birds["activations"].device
    primary_maps, other_maps = (
        target.maps(module, birds["activations"], size, rows.to(device)).cpu() for rows in (primary, other)
    )
    strips, captions = [], []
    symbol = target.target.score_name
    for b, (first, second, true, index) in enumerate(
        zip(primary.tolist(), other.tolist(), labels.tolist(), birds["index"].tolist())
    ):
        cells = [
            Cell(birds["rgb"][b], birds["box"][b], true, primary_maps[b], first),
            Cell(birds["rgb"][b], birds["box"][b], true, other_maps[b] if first != second else None, second),
        ]
        strips.append(render_strip(cells, style.colormap, style.alpha, style.box_threshold))
        t, p = (first, second) if choice == "true" else (second, first)
        captions.append(
            f"#{index}, epoch {epoch}\ntrue: {name(names, t)} ({symbol} {scores[b, t]:.2f})\n"
            f"pred: {name(names, p)} ({symbol} {scores[b, p]:.2f})\n"
            f"{'maps: true | predicted' if t != p else 'map: true = predicted'}"
        )
    truth = [name(names, t) for t in labels.tolist()]
    preds = [(name(names, p), float(scores[b, p])) for b, p in enumerate(predicted.tolist())]
    return _panel(epoch, birds, strips, captions, names, primary_maps, truth, preds, style)


def neighbour_panel(
    module: CAMModule,
    birds: dict[str, Any],
    neighbours: dict[str, Any],
    target: EpochTarget,
    epoch: int,
    names: list[str],
    style: Style,
) -> Panel:
    """Single Point Proxy: each bird against its nearest other validation image, and that neighbour against the
    bird, side by side (each side's embedding is the other's proxy)."""
    size = tuple(birds["image"].shape[-2:])
    device = birds["activations"].device
    ours, theirs = F.normalize(birds["output"].float(), dim=1), F.normalize(neighbours["output"].float(), dim=1)
    rows = torch.arange(len(ours), device=device)
    maps = target.maps(module, birds["activations"], size, rows, Proxies(theirs)).cpu()
    back = target.maps(module, neighbours["activations"], size, rows, Proxies(ours)).cpu()
    similarity = (ours * theirs).sum(1).cpu()
    strips, captions = [], []
    for b, (true, other) in enumerate(zip(birds["label"].tolist(), neighbours["label"].tolist())):
        cells = [
            Cell(birds["rgb"][b], birds["box"][b], true, maps[b], other),
            Cell(neighbours["rgb"][b], neighbours["box"][b], other, back[b], true),
        ]
        strips.append(render_strip(cells, style.colormap, style.alpha, style.box_threshold))
        captions.append(
            f"#{int(birds['index'][b])}, epoch {epoch}\ntrue: {name(names, true)}\nnearest "
            f"#{int(neighbours['index'][b])}: {name(names, other)} (cos {similarity[b]:.2f})"
        )
    truth = [name(names, t) for t in birds["label"].tolist()]
    preds = [(name(names, o), float(c)) for o, c in zip(neighbours["label"].tolist(), similarity.tolist())]
    return _panel(epoch, birds, strips, captions, names, maps, truth, preds, style)


def _panel(
    epoch: int,
    birds: dict[str, Any],
    strips: list[Strip],
    captions: list[str],
    names: list[str],
    primary_maps: Tensor,
    truth: list[str],
    predictions: list[tuple[str, float]],
    style: Style,
) -> Panel:
    """The panel with each bird's localization numbers, from its primary map (the first cell of its strip)."""
    boxes = np.asarray(birds["box"], dtype=np.float64).reshape(-1, 4)
    ratios = heatmap_ratio(primary_maps, boxes)
    peaks = pointing_game(primary_maps, boxes=boxes)
    rows: list[BirdRow] = []
    for b, index in enumerate(birds["index"].tolist()):
        box = cam_box(primary_maps[b], style.box_threshold)
        iou = float(box_iou(box, boxes[b])) if box is not None else 0.0
        rows.append(
            BirdRow(
                index=index,
                true=truth[b],
                predicted=predictions[b][0],
                score=predictions[b][1],
                cam_box_iou=iou,
                heatmap_ratio=float(ratios[b]),
                peak_in_box=bool(peaks[b] > 0.5),
            )
        )
    width = int(birds["rgb"][0].shape[1])
    return Panel(epoch, birds["index"].tolist(), strips, captions, names, rows, width)


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
        data = [
            {
                "position": {
                    "minX": round(x),
                    "maxX": round(x + w),
                    "minY": round(y),
                    "maxY": round(y + h),
                },
                "domain": "pixel",
                "class_id": int(c),
                "box_caption": f"{group}: {name(class_names, c)}",
            }
            for (x, y, w, h), c in boxes
        ]
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
