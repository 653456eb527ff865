"""``cubcam evaluate --finer``'s "most confused pairs": which classes the model mixes up most on the split, and, per
pair, the maps that tell the two apart (Finer-CAM of each class with the other as its one rival, beside the plain
map).

A classifier confuses the classes it predicts for each other; an embedding net those whose class proxy lies nearest
an image of the other (its prediction is the nearest Normalized Mean Proxy). A pair counts both directions.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cubcam.cams.figure import grid, marked, save_png, unbroken
from cubcam.cams.methods import Method
from cubcam.cams.overlay import denormalize
from cubcam.cams.protocol import HeadExplainer, explain, explainer_for, features_for, finer_maps
from cubcam.cams.targets import ExplanationTarget
from cubcam.train.data.cub import CUBDataset

CONFUSED_PAIRS = 3  # pairs shown in metrics.md, each with one figure


def confused_pairs(labels: np.ndarray, predicted: np.ndarray, count: int = CONFUSED_PAIRS) -> list[dict[str, Any]]:
    """The ``count`` class pairs most often mistaken for each other (both directions summed; ties by the smaller
    class index): ``{"classes": [a, b], "count": n, "slots": {a: [slot of an image of a predicted as b, ...],
    b: [...]}}``, slots being positions in the scored split. Empty where nothing was mistaken."""
    pairs: Counter[tuple[int, int]] = Counter()
    slots: dict[tuple[int, int], list[int]] = {}
    for slot, (true, pred) in enumerate(zip(labels.tolist(), predicted.tolist())):
        if true < 0 or true == pred:
            continue
        pair = (min(true, pred), max(true, pred))
        pairs[pair] += 1
        slots.setdefault((true, pred), []).append(slot)
    ranked = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:count]
    return [
        {
            "classes": list(pair),
            "count": n,
            "slots": {c: slots.get((c, pair[1] if c == pair[0] else pair[0]), []) for c in pair},
        }
        for pair, n in ranked
    ]


def pair_figure(
    module: Any,
    target: ExplanationTarget,
    method: Method,
    dataset: Any,
    pair: dict[str, Any],
    labels: np.ndarray,
    device: torch.device,
    channel_batch_size: int,
) -> np.ndarray:
    """One row per class of ``pair``: an image of it (one the model took for the other class, else its first in the
    split), its plain map and its Finer-CAM map against the other class. Returns the figure, uint8 [H, W, 3]."""
    a, b = pair["classes"]
    slots = []
    for c in (a, b):
        mistaken = pair["slots"].get(c) or []
        slots.append(mistaken[0] if mistaken else int(np.flatnonzero(labels == c)[0]))
    samples = [dataset[s] for s in slots]
    images = torch.stack([s["image"] for s in samples]).to(device)
    head = HeadExplainer(module)
    explainer = explainer_for(module, method, channel_batch_size)
    activations, outputs = head.features_and_outputs(images)
    features = features_for(explainer, activations, images)
    size = (images.shape[-2], images.shape[-1])
    classes = torch.tensor([a, b], device=device)
    step = explain(explainer, features, outputs, target, size, classes, "true", method)
    finer, _ = finer_maps(explainer, features, outputs, target.target, size, classes, classes.flip(0)[:, None], method)
    names = dataset_names(dataset)
    tiles, captions, cams, boxes = [], [], [], []
    for i, (own, other) in enumerate(((a, b), (b, a))):
        pixels = denormalize(samples[i]["image"])
        predicted = names[int(step.predicted[i])]
        truth = f"true: {unbroken(names[own])}\npred: {unbroken(predicted)}"
        for cam, text in ((step.maps[i].cpu(), truth), (finer[i].cpu(), None)):
            tiles.append(pixels)
            cams.append(cam)
            boxes.append(samples[i]["box"])
            captions.append(marked(text or f"Finer-CAM: what tells it\napart from {unbroken(names[other])}", cam))
    return grid(tiles, captions, ncols=2, cams=cams, boxes=boxes)


def dataset_names(dataset: Any) -> list[str]:
    """The class names of a dataset or of a ``Subset`` of one."""
    while not isinstance(dataset, CUBDataset):
        dataset = dataset.dataset
    return list(dataset.class_names)


def write_confused(
    out: Path,
    module: Any,
    target: ExplanationTarget,
    method: Method,
    dataset: Any,
    labels: np.ndarray,
    predicted: np.ndarray,
    device: torch.device,
    channel_batch_size: int,
) -> list[dict[str, Any]]:
    """The most confused pairs, each with its figure ``confused_<n>.png`` in ``out``; returns their records (class
    names, count, figure) for metrics.json and :func:`confused_section`."""
    names = dataset_names(dataset)
    records = []
    for n, pair in enumerate(confused_pairs(labels, predicted), start=1):
        figure = pair_figure(module, target, method, dataset, pair, labels, device, channel_batch_size)
        save_png(figure, out / f"confused_{n}.png")
        a, b = pair["classes"]
        records.append({"classes": [names[a], names[b]], "count": pair["count"], "figure": f"confused_{n}.png"})
    return records


def confused_section(records: list[dict[str, Any]], escape: Any) -> str:
    """The "most confused pairs" section of metrics.md (``escape``: its Markdown escaping of names)."""
    if not records:
        return "\n## Most confused pairs\n\nNo image of the split was taken for another class.\n"
    lines = [
        "",
        "## Most confused pairs",
        "",
        "Each figure: an image of each class, its map and what tells it apart.",
        "",
    ]
    for r in records:
        a, b = (escape(name) for name in r["classes"])
        lines.append(f"- {a} and {b}: {r['count']} image(s) mistaken ![{a} and {b}]({r['figure']})")
    return "\n".join(lines) + "\n"
