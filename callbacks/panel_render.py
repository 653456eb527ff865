"""Rendering: the panel as pixels. A bird is two cells side by side (its map and a second view), with boxes.

A bird is shown as a strip of two cells so every W&B image of a panel has the same size (W&B draws a list of
differently sized images wrongly): the primary map, then the other class's map when it differs (classifier: true
vs predicted; embedding net: true class's proxy vs nearest proxy), the nearest other image with its own map, or
else the plain image. The maps come from the explanation step of the tools (``cubcam.cams.protocol.explain`` and
``pair_maps``); nothing here knows Lightning or W&B objects: the sinks (``sinks.py``) take a :class:`Panel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cubcam.callbacks.panel_data import BirdRow, Panel, name
from cubcam.cams.engine import Weighting
from cubcam.cams.figure import Cell, Strip, cam_box, marked, pair_strips, render_strip
from cubcam.cams.localization import box_iou, heatmap_ratio, pointing_game
from cubcam.cams.protocol import Choice, Explainer, explain, pair_maps
from cubcam.cams.targets import ExplanationTarget


@dataclass
class Style:
    colormap: str = "jet"
    alpha: float = 0.5
    box_threshold: float = 0.5  # where the CAM box is cut: MaxBoxAcc's best IoU-0.5 threshold once measured


def class_panel(
    explainer: Explainer,
    birds: dict[str, Any],
    target: ExplanationTarget,
    choice: Choice,
    weighting: Weighting,
    epoch: int,
    names: list[str],
    style: Style,
) -> Panel:
    """Each bird's map for the ``choice`` class, then for the other one (true vs predicted) where they differ,
    else the plain image: GradCAM of the class logit, or EmbeddingCAM of the class proxy (predicted: nearest)."""
    size = (int(birds["image"].shape[-2]), int(birds["image"].shape[-1]))
    other_choice: Choice = "predicted" if choice == "true" else "true"
    primary, other = (
        explain(explainer, birds["activations"], birds["output"], target, size, birds["label"], c, weighting)
        for c in (choice, other_choice)
    )
    scores, labels = primary.class_scores.cpu(), birds["label"].cpu()
    primary_maps, other_maps = primary.maps.cpu(), other.maps.cpu()
    strips, captions = [], []
    symbol = target.target.score_name
    for b, (first, second, true, index) in enumerate(
        zip(primary.explained.tolist(), other.explained.tolist(), labels.tolist(), birds["index"].tolist())
    ):
        cells = [
            Cell(birds["rgb"][b], birds["box"][b], true, primary_maps[b], first),
            Cell(birds["rgb"][b], birds["box"][b], true, other_maps[b] if first != second else None, second),
        ]
        strips.append(render_strip(cells, style.colormap, style.alpha, style.box_threshold))
        t, p = (first, second) if choice == "true" else (second, first)
        true_map, predicted_map = (
            (primary_maps[b], other_maps[b]) if choice == "true" else (other_maps[b], primary_maps[b])
        )
        maps = (
            f"maps: {marked('true', true_map)} | {marked('predicted', predicted_map)}"
            if t != p
            else f"map: {marked('true = predicted', primary_maps[b])}"
        )
        captions.append(
            f"#{index}, epoch {epoch}\ntrue: {name(names, t)} ({symbol} {scores[b, t]:.2f})\n"
            f"pred: {name(names, p)} ({symbol} {scores[b, p]:.2f})\n{maps}"
        )
    truth = [name(names, t) for t in labels.tolist()]
    preds = [(name(names, p), float(scores[b, p])) for b, p in enumerate(primary.predicted.tolist())]
    return _panel(epoch, birds, strips, captions, names, primary_maps, truth, preds, style)


def neighbour_panel(
    explainer: Explainer,
    birds: dict[str, Any],
    neighbours: dict[str, Any],
    weighting: Weighting,
    epoch: int,
    names: list[str],
    style: Style,
) -> Panel:
    """The nearest-image view (``single_point_nearest``): each bird against its nearest other validation image,
    and that neighbour against the bird, side by side (each side's embedding is the other's proxy)."""
    size = (int(birds["image"].shape[-2]), int(birds["image"].shape[-1]))
    pairs = pair_maps(
        explainer,
        (birds["activations"], birds["output"]),
        (neighbours["activations"], neighbours["output"]),
        size,
        weighting,
    )
    maps, similarity = pairs.first.cpu(), pairs.cosine.cpu()
    labels, others = birds["label"].tolist(), neighbours["label"].tolist()
    strips = pair_strips(
        birds["rgb"],
        neighbours["rgb"],
        pairs,
        (birds["box"], neighbours["box"]),
        (labels, others),
        style.colormap,
        style.alpha,
        style.box_threshold,
    )
    captions = [
        f"#{int(birds['index'][b])}, epoch {epoch}\ntrue: {name(names, true)}\nnearest "
        f"#{int(neighbours['index'][b])}: {name(names, other)} (cos {similarity[b]:.2f})"
        for b, (true, other) in enumerate(zip(labels, others))
    ]
    truth = [name(names, t) for t in labels]
    preds = [(name(names, o), float(c)) for o, c in zip(others, similarity.tolist())]
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
    finite = torch.isfinite(primary_maps).flatten(1).all(1)  # a diverged model's maps: NaN numbers, no box
    maps = torch.where(finite[:, None, None], primary_maps, torch.zeros_like(primary_maps))
    ratios = np.where(finite.numpy(), heatmap_ratio(maps, boxes), np.nan)
    peaks = np.where(finite.numpy(), pointing_game(maps, boxes=boxes), 0.0)
    rows: list[BirdRow] = []
    for b, index in enumerate(birds["index"].tolist()):
        has_box = bool((boxes[b, 2:] > 0).all())  # data without boxes: nothing to score, empty cells
        box = cam_box(primary_maps[b], style.box_threshold) if has_box else None
        rows.append(
            BirdRow(
                index=index,
                true=truth[b],
                predicted=predictions[b][0],
                score=predictions[b][1],
                cam_box_iou=(float(box_iou(box, boxes[b])) if box is not None else 0.0) if has_box else None,
                heatmap_ratio=float(ratios[b]) if has_box else None,
                peak_in_box=bool(peaks[b] > 0.5) if has_box else None,
            )
        )
    width = int(birds["rgb"][0].shape[1])
    return Panel(epoch, birds["index"].tolist(), strips, captions, names, rows, width)
