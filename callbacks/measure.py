"""Measuring: what the epoch's maps explain, and how well the metric subset's maps localize the birds.

``epoch_target`` is the one place where a classifier and an embedding net differ for the callback: it returns the
target (class logits, or proxies built from this epoch's embeddings) and how each image picks its row of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cubcam.callbacks.collect import Outputs
from cubcam.cams.engine import Weighting
from cubcam.cams.localization import LocalizationAccumulator
from cubcam.cams.protocol import CAMModule, head_cams
from cubcam.cams.proxies import normalized_mean_proxies
from cubcam.cams.targets import ClassLogits, Method, Proxies, Target

ProxyScheme = Literal["normalized_mean", "single_point"]
METRIC_KEYS = {  # logged key -> LocalizationAccumulator key
    "val/cam_max_box_acc": "max_box_acc",
    "val/cam_box_acc_iou50": "box_acc_iou50",
    "val/cam_heatmap_ratio": "heatmap_ratio",
    "val/cam_pointing_game": "pointing_game",  # the peak inside the GT box
}
METRIC_CHUNK = 64  # subset images per head-only CAM / box-metric batch


@dataclass
class EpochTarget:
    """What this epoch's maps explain: ``target`` and, per image, its row.

    Classifier: the true class's logit. Embedding net: the true class's Normalized Mean Proxy over this epoch's
    validation embeddings, or (``single_point``) the embedding of the nearest other validation image.
    """

    target: Target
    outputs: Outputs
    neighbours: bool = False  # rows are the nearest other images' rows in ``outputs``
    weighting: Weighting = "gradcam"  # how the gradients weight the maps (the CAM family)

    def rows(self, index: Tensor, labels: Tensor) -> Tensor:
        return nearest_other(self.outputs, index) if self.neighbours else labels

    def maps(
        self, module: CAMModule, activations: Tensor, size: tuple[int, int], rows: Tensor, target: Target | None = None
    ) -> Tensor:
        """Head-only maps [B, H, W] for ``rows`` of ``target`` (default: the epoch's), with the epoch's weighting."""
        return head_cams(module, activations, size, target or self.target, rows, self.weighting)


def epoch_target(
    method: Method, proxy: ProxyScheme, outputs: Outputs, num_classes: int, weighting: Weighting = "gradcam"
) -> EpochTarget:
    if method == "gradcam":
        return EpochTarget(ClassLogits(), outputs, weighting=weighting)
    num_classes = max(num_classes, int(outputs.label.max()) + 1)
    mean = normalized_mean_proxies(outputs.output, outputs.label, num_classes=num_classes)
    if proxy == "normalized_mean":
        return EpochTarget(Proxies(mean), outputs, weighting=weighting)
    unit = F.normalize(outputs.output, dim=1)
    return EpochTarget(Proxies(unit, classes=mean), outputs, neighbours=True, weighting=weighting)


def nearest_other(outputs: Outputs, index: Tensor) -> Tensor:
    """For each dataset index, the row of the most cosine-similar OTHER validation image in ``outputs``."""
    unit = F.normalize(outputs.output.float(), dim=1)
    index = index.to(outputs.index.device)
    rows = torch.searchsorted(outputs.index, index).clamp(max=len(outputs.index) - 1)
    if not torch.equal(outputs.index[rows], index):
        raise ValueError("nearest_other: some indices have no output in this validation run")
    similarity = unit[rows] @ unit.T
    similarity[torch.arange(len(rows)), rows] = -torch.inf
    return similarity.argmax(1)


def measure(
    module: CAMModule,
    columns: dict[str, Tensor],
    target: EpochTarget,
    subset: list[int],
    size: tuple[int, int],
    device: torch.device,
    workers: int,
    reduce_sum: Callable[[Tensor], Tensor],
) -> dict[str, float | np.ndarray] | None:
    """The localization scores of the metric subset over all ranks (every rank must call it: it reduces).

    ``columns`` are this rank's subset rows (``EpochCollector.subset_columns``); the maps are the true class's (the
    WSOL convention) or the proxy's. Returns None when no subset image was validated this epoch.
    """
    accumulator = LocalizationAccumulator(len(subset), workers=workers)
    slot = {index: s for s, index in enumerate(subset)}
    for start in range(0, len(columns.get("index", [])), METRIC_CHUNK):
        part = {key: value[start : start + METRIC_CHUNK] for key, value in columns.items()}
        rows = target.rows(part["index"], part["label"])
        maps = target.maps(module, part["activations"].to(device), size, rows.to(device))
        accumulator.update([slot[int(i)] for i in part["index"]], maps.float().cpu(), part["box"])
    accumulator.merge(lambda rows: reduce_sum(rows.to(device)))
    return accumulator.compute() if accumulator.num_images else None
