"""Rendering: the panel as pixels. A bird is two cells side by side (its map and a second view), with boxes.

A bird is shown as a strip of two cells so every W&B image of a panel has the same size (W&B draws a list of
differently sized images wrongly): the primary map, then the other class's map when it differs (classifier: true
vs predicted; embedding net: true class's proxy vs nearest proxy), the nearest other image with its own map, or
else the plain image. With Finer-CAM (``CAMPanel(finer=...)``) every strip of the panel gets a third cell: the
Finer-CAM map where the bird has one (a bird the model gets wrong: what tells its true class apart from the
predicted one), else white. The maps come from the explanation step of the tools (``cubcam.cams.protocol.explain`` and
``pair_maps``); nothing here knows Lightning or W&B objects: the sinks (``sinks.py``) take a :class:`Panel`.

Each view has two halves: ``*_inputs`` runs where the model is (the loop's thread, on the module's device) and
keeps the maps at the layer's grid; ``*_panel`` upsamples and draws them on the picture thread, from CPU tensors
and plain values alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cubcam.callbacks.options import FinerMode
from cubcam.callbacks.panel_data import BirdRow, Panel, name
from cubcam.cams.figure import BOX_LEGEND, Cell, Strip, marked, pair_strips, render_strip, unbroken
from cubcam.cams.localization import box_iou, heatmap_ratio, pointing_game
from cubcam.cams.methods import Method, method_spec
from cubcam.cams.overlay import denormalize
from cubcam.cams.protocol import Choice, Explainer, PairMaps, explain, finer_maps, pair_maps, upsample
from cubcam.cams.targets import FINER_RIVALS, ClassLogits, ExplanationTarget, Proxies, ScoreOf

MIN_TILE = 128  # px: smaller images (MNIST's 28, CIFAR's 32) are enlarged to at least this, to be seen and captioned


def tile_pixels(images: Tensor, normalization: tuple[list[float], list[float]]) -> tuple[list[np.ndarray], int]:
    """The images as the eye sees them (``denormalize``: any channel count) and the whole factor they were
    enlarged by: images under ``MIN_TILE`` px a side are repeated pixel for pixel (nearest: a digit's pixels stay
    sharp), so that their maps and captions can be read; the maps are drawn at the enlarged size."""
    pixels = denormalize(images, *normalization)
    factor = -(-MIN_TILE // min(pixels.shape[1:3]))
    if factor > 1:
        pixels = pixels.repeat(factor, axis=1).repeat(factor, axis=2)
    return list(pixels), max(factor, 1)


@dataclass
class Style:
    colormap: str = "jet"
    alpha: float = 0.5
    box_threshold: float = 0.5  # where the CAM box is cut: MaxBoxAcc's best IoU-0.5 threshold once measured


def class_inputs(
    explainer: Explainer,
    birds: dict[str, Tensor],
    target: ExplanationTarget,
    choice: Choice,
    method: Method,
    finer: FinerMode = "off",
) -> dict[str, Tensor]:
    """What :func:`class_panel` draws, made where the model is (the loop's thread, the module's device): each bird's
    map for the ``choice`` class and for the other one (true vs predicted) at the layer's grid, what they explain
    and the class scores, as CPU tensors (small: a grid map is 49 to 196 numbers). With ``finer``, also each
    bird's Finer-CAM map (:func:`finer_inputs`)."""
    other_choice: Choice = "predicted" if choice == "true" else "true"
    primary, other = (
        explain(explainer, birds["activations"], birds["output"], target, None, birds["label"], c, method)
        for c in (choice, other_choice)
    )
    columns = {key: birds[key] for key in ("index", "image", "box", "label")}
    columns |= {
        "primary": primary.maps,
        "other": other.maps,
        "first": primary.explained,
        "second": other.explained,
        "predicted": primary.predicted,
        "scores": primary.class_scores.float(),
    }
    columns["heatmap_ratio"], columns["peak_in_box"] = box_scores(primary.maps, birds["box"], birds["image"].shape[-2:])
    if finer != "off" and finer_possible(target, method, birds["output"]):
        columns |= finer_inputs(explainer, birds, target, method, finer, primary.predicted)
    return {key: value.detach().cpu() for key, value in columns.items()}


def finer_possible(target: ExplanationTarget, method: Method, outputs: Tensor) -> bool:
    """Whether a bird's class has a rival to subtract: classes to rank (logits of two or more classes, or class
    proxies; not a user's ``score=``), and a method that uses the score."""
    if method_spec(method).needs == "nothing" or target.neighbours or isinstance(target.target, ScoreOf):
        return False
    if isinstance(target.target, ClassLogits):
        return outputs.dim() == 2 and outputs.shape[1] >= 2
    return isinstance(target.target, Proxies) and len(target.target.classes) >= 2


def finer_inputs(
    explainer: Explainer,
    birds: dict[str, Tensor],
    target: ExplanationTarget,
    method: Method,
    finer: FinerMode,
    predicted: Tensor,
) -> dict[str, Tensor]:
    """Each bird's Finer-CAM map at the layer's grid, its rows (the true class, then its rivals), whether it is
    drawn, and its box scores: "wrong" explains the true class against the predicted one and draws the birds the
    model gets wrong; "every" explains it against its ``FINER_RIVALS`` nearest and draws them all."""
    labels = birds["label"].to(predicted.device)
    rivals: int | Tensor = predicted[:, None] if finer == "wrong" else FINER_RIVALS
    maps, rows = finer_maps(
        explainer, birds["activations"], birds["output"], target.target, None, labels, rivals, method
    )
    drawn = labels != predicted if finer == "wrong" else torch.ones_like(labels, dtype=torch.bool)
    ratio, peak = box_scores(maps, birds["box"], birds["image"].shape[-2:])
    return {
        "finer": maps,
        "finer_rows": rows,
        "finer_drawn": drawn,
        "finer_heatmap_ratio": ratio,
        "finer_peak_in_box": peak,
        "finer_every": torch.tensor(finer == "every"),
    }


def box_scores(maps: Tensor, boxes: Tensor, size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Each map's heatmap ratio and whether its peak lies in the box, from ``maps`` [N, h, w] at the layer's grid
    upsampled to ``size``, where they are (the module's device); a map that is not finite (a diverged model's) has a
    NaN ratio and no peak in the box."""
    upsampled = upsample(maps, (int(size[0]), int(size[1])))
    finite = torch.isfinite(upsampled).flatten(1).all(1)
    upsampled = torch.where(finite[:, None, None], upsampled, torch.zeros_like(upsampled))
    ratio = torch.where(finite, heatmap_ratio(upsampled, boxes).to(finite.device), torch.nan)
    peak = finite & (pointing_game(upsampled, boxes=boxes).to(finite.device) > 0.5)
    return ratio.float(), peak


def class_panel(
    inputs: dict[str, Tensor],
    rgb: list[np.ndarray],
    choice: Choice,
    symbol: str,
    epoch: int,
    names: list[str],
    style: Style,
) -> Panel:
    """Each bird's map for the ``choice`` class, then for the other one where they differ, else the plain image
    (GradCAM of the class logit, or EmbeddingCAM of the class proxy; predicted: nearest), from
    :func:`class_inputs`; ``rgb`` are the birds' pixels (:func:`tile_pixels`, with ``inputs``' boxes in their
    pixels) and ``symbol`` names the class score (p or cos)."""
    size = rgb[0].shape[:2]
    primary_maps, other_maps = upsample(inputs["primary"], size), upsample(inputs["other"], size)
    scores, labels = inputs["scores"], inputs["label"]
    finer_drawn = inputs["finer_drawn"].tolist() if "finer_drawn" in inputs else []
    finer_maps_ = upsample(inputs["finer"], size) if any(finer_drawn) else None
    strips, captions = [], []
    for b, (first, second, true, index) in enumerate(
        zip(inputs["first"].tolist(), inputs["second"].tolist(), labels.tolist(), inputs["index"].tolist())
    ):
        cells = [
            Cell(rgb[b], inputs["box"][b], true, primary_maps[b], first),
            Cell(rgb[b], inputs["box"][b], true, other_maps[b] if first != second else None, second),
        ]
        finer_line = ""
        if finer_maps_ is not None:  # a third cell on every strip of the panel: W&B wants them all one size
            if finer_drawn[b]:
                cells.append(Cell(rgb[b], inputs["box"][b], true, finer_maps_[b], true))
                finer_line = "\n" + finer_caption(inputs["finer_rows"][b].tolist(), names, finer_maps_[b])
            else:
                cells.append(Cell(np.full_like(rgb[b], 255), None, true))
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
            # the score before the name: a name too long for a small tile is cut, never the score
            f"#{index}, epoch {epoch}\ntrue ({symbol} {scores[b, t]:.2f}): {unbroken(name(names, t))}\n"
            f"pred ({symbol} {scores[b, p]:.2f}): {unbroken(name(names, p))}\n{maps}{finer_line}"
        )
    truth = [name(names, t) for t in labels.tolist()]
    preds = [(name(names, p), float(scores[b, p])) for b, p in enumerate(inputs["predicted"].tolist())]
    other: Choice = "predicted" if choice == "true" else "true"
    legend = (
        f"{BOX_LEGEND} Each bird: the map of its {choice} class, then of its {other} class where they differ "
        "(else the bird alone)"
    )
    if finer_maps_ is not None:
        rivals = int(inputs["finer_rows"].shape[1]) - 1
        legend += (
            f"; 3rd: Finer-CAM, the true class's score minus its {rivals} nearest classes' (what tells them apart)"
            if bool(inputs["finer_every"])
            else "; 3rd: Finer-CAM, what tells the true class apart from the predicted one (the true class's score "
            "minus the predicted class's), for the birds the model gets wrong"
        )
    return _panel(epoch, inputs, rgb, strips, captions, names, primary_maps, truth, preds, style, legend + ".")


def finer_caption(rows: list[int], names: list[str], cam: Tensor) -> str:
    """The caption line of a Finer-CAM cell: what tells the true class apart from its one rival (the predicted
    class), or from its nearest rivals."""
    true, *rivals = rows
    against = unbroken(name(names, rivals[0])) if len(rivals) == 1 else f"its {len(rivals)} nearest classes"
    return marked(f"3rd: Finer-CAM, {unbroken(name(names, true))} minus {against}", cam)


NEIGHBOUR = "neighbour_"  # the prefix of the neighbours' columns in :func:`neighbour_inputs`


def neighbour_inputs(
    explainer: Explainer, birds: dict[str, Tensor], neighbours: dict[str, Tensor], method: Method
) -> dict[str, Tensor]:
    """What :func:`neighbour_panel` draws, made where the model is: each bird against its nearest other validation
    image and that neighbour against the bird (each side's embedding is the other's proxy), maps at the layer's
    grid, and their cosine, as CPU tensors; the neighbours' columns are prefixed ``NEIGHBOUR``."""
    pairs = pair_maps(
        explainer,
        (birds["activations"], birds["output"]),
        (neighbours["activations"], neighbours["output"]),
        None,
        method,
    )
    keys = ("index", "image", "box", "label")
    columns = {key: birds[key] for key in keys} | {NEIGHBOUR + key: neighbours[key] for key in keys}
    columns |= {"maps": pairs.first, NEIGHBOUR + "maps": pairs.second, "cosine": pairs.cosine.float()}
    columns["heatmap_ratio"], columns["peak_in_box"] = box_scores(pairs.first, birds["box"], birds["image"].shape[-2:])
    return {key: value.detach().cpu() for key, value in columns.items()}


def neighbour_panel(
    inputs: dict[str, Tensor],
    rgb: list[np.ndarray],
    neighbour_rgb: list[np.ndarray],
    epoch: int,
    names: list[str],
    style: Style,
) -> Panel:
    """The nearest-image view (``single_point_nearest``) from :func:`neighbour_inputs`: each bird and its nearest
    other validation image side by side, each with its map against the other."""
    size = rgb[0].shape[:2]
    pairs = PairMaps(upsample(inputs["maps"], size), upsample(inputs[NEIGHBOUR + "maps"], size), inputs["cosine"])
    labels, others = inputs["label"].tolist(), inputs[NEIGHBOUR + "label"].tolist()
    strips = pair_strips(
        rgb,
        neighbour_rgb,
        pairs,
        (list(inputs["box"]), list(inputs[NEIGHBOUR + "box"])),
        (labels, others),
        style.colormap,
        style.alpha,
        style.box_threshold,
    )
    captions = [
        f"#{int(inputs['index'][b])}, epoch {epoch}\ntrue: {unbroken(name(names, true))}\nnearest "
        f"#{int(inputs[NEIGHBOUR + 'index'][b])} (cos {pairs.cosine[b]:.2f}): {unbroken(name(names, other))}"
        for b, (true, other) in enumerate(zip(labels, others))
    ]
    truth = [name(names, t) for t in labels]
    preds = [(name(names, o), float(c)) for o, c in zip(others, pairs.cosine.tolist())]
    legend = (
        f"{BOX_LEGEND} Each bird: its map against its nearest other validation image, then that image with its map "
        "against the bird."
    )
    return _panel(epoch, inputs, rgb, strips, captions, names, pairs.first, truth, preds, style, legend)


def _panel(
    epoch: int,
    birds: dict[str, Tensor],
    rgb: list[np.ndarray],
    strips: list[Strip],
    captions: list[str],
    names: list[str],
    primary_maps: Tensor,
    truth: list[str],
    predictions: list[tuple[str, float]],
    style: Style,
    legend: str = "",
) -> Panel:
    """The panel with each bird's localization numbers: its primary map's (:func:`box_scores`) and the IoU of the
    CAM box drawn on its first cell."""
    boxes = np.asarray(birds["box"], dtype=np.float64).reshape(-1, 4)
    ratios, peaks = birds["heatmap_ratio"].tolist(), birds["peak_in_box"].tolist()
    count = len(ratios)
    drawn = birds["finer_drawn"].tolist() if "finer_drawn" in birds else [False] * count
    finer_ratios = birds["finer_heatmap_ratio"].tolist() if "finer_drawn" in birds else [None] * count
    finer_peaks = birds["finer_peak_in_box"].tolist() if "finer_drawn" in birds else [None] * count
    rows: list[BirdRow] = []
    for b, index in enumerate(birds["index"].tolist()):
        has_box = bool((boxes[b, 2:] > 0).all())  # data without boxes: nothing to score, empty cells
        box = strips[b].cell_cam_boxes[0] if has_box else None  # the primary map's, as drawn
        rows.append(
            BirdRow(
                index=index,
                true=truth[b],
                predicted=predictions[b][0],
                score=predictions[b][1],
                cam_box_iou=(float(box_iou(box, boxes[b])) if box is not None else 0.0) if has_box else None,
                heatmap_ratio=ratios[b] if has_box else None,
                peak_in_box=bool(peaks[b]) if has_box else None,
                finer_heatmap_ratio=finer_ratios[b] if has_box and drawn[b] else None,
                finer_peak_in_box=bool(finer_peaks[b]) if has_box and drawn[b] else None,
            )
        )
    return Panel(epoch, birds["index"].tolist(), strips, captions, names, rows, legend)
