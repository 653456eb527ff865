"""Measuring: how well the metric subset's maps localize the birds, over all ranks.

The maps are the explanation step of the tools (``cubcam.cams.protocol.explain``) for the true class (the WSOL
convention) or its proxy; the scores are ``cubcam.cams.localization.LocalizationAccumulator``'s, as in
``cubcam evaluate``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from cubcam.cams.engine import Weighting
from cubcam.cams.localization import LocalizationAccumulator
from cubcam.cams.protocol import Explainer, explain
from cubcam.cams.targets import ExplanationTarget

METRIC_KEYS = {  # logged key -> LocalizationAccumulator key
    "val/cam_max_box_acc": "max_box_acc",
    "val/cam_box_acc_iou50": "box_acc_iou50",
    "val/cam_heatmap_ratio": "heatmap_ratio",
    "val/cam_pointing_game": "pointing_game",  # the peak inside the GT box
}
METRIC_CHUNK = 64  # subset images per explanation / box-metric batch


def measure(
    explainer: Explainer,
    columns: dict[str, Tensor],
    target: ExplanationTarget,
    weighting: Weighting,
    subset: list[int],
    size: tuple[int, int],
    device: torch.device,
    workers: int,
    reduce_sum: Callable[[Tensor], Tensor],
) -> dict[str, float | np.ndarray] | None:
    """The localization scores of the metric subset over all ranks (every rank must call it: it reduces).

    ``columns`` are this rank's subset rows (``index``, ``activations``, ``output``, ``label``, ``box``; the
    explainer's features under ``activations``), ``size`` their images' (the maps'). Returns None when no subset
    image was validated this epoch.
    """
    accumulator = LocalizationAccumulator(len(subset), workers=workers)
    slot = {index: s for s, index in enumerate(subset)}
    for start in range(0, len(columns.get("index", [])), METRIC_CHUNK):
        part = {key: value[start : start + METRIC_CHUNK] for key, value in columns.items()}
        step = explain(
            explainer,
            part["activations"].to(device),
            part["output"].to(device),
            target,
            size,
            part["label"],
            "true",
            weighting,
            part["index"],
        )
        accumulator.update([slot[int(i)] for i in part["index"]], step.maps.float().cpu(), part["box"])
    accumulator.merge(lambda rows: reduce_sum(rows.to(device)))
    return accumulator.compute() if accumulator.num_images else None
