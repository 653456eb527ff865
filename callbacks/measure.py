"""Measuring: how well the metric subset's maps localize the birds, over all ranks.

Two halves, split where the model is no longer needed. :func:`subset_maps` runs on the loop's thread, on the
module's device: the maps of this rank's subset images at the layer's grid (head-only where the module speaks the
CAM protocol), for the true class (the WSOL convention) or its proxy, gathered to every rank (small: 512 x 7 x 7
numbers, not the activations). :func:`score_maps` runs anywhere (the callback's worker thread): it upsamples them
to the image size and scores them with ``cubcam.cams.localization.LocalizationAccumulator``, as ``cubcam evaluate``
does, so the same maps give the same numbers wherever they are scored.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cubcam.cams.distributed import AllGather, gather_unique
from cubcam.cams.engine import Weighting
from cubcam.cams.labelling import ScorePool, pays_off, score_rows
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
Scores = dict[str, float | np.ndarray]


def subset_maps(
    explainer: Explainer,
    columns: dict[str, Tensor],
    target: ExplanationTarget,
    weighting: Weighting,
    subset: list[int],
    device: torch.device,
    all_gather: AllGather | None = None,
    world_size: int = 1,
) -> dict[str, Tensor]:
    """The metric subset's raw maps at the layer's grid, of every rank (``all_gather``: Lightning's
    ``strategy.all_gather``; with ``world_size`` > 1 every rank must call it), as CPU tensors: ``slot`` (the
    image's position in ``subset``), ``maps`` [N, h, w] and ``box`` [N, 4], each image once.

    ``columns`` are this rank's subset rows (``index``, ``activations``, ``output``, ``label``, ``box``; the
    explainer's features under ``activations``) on the device they were kept on.
    """
    slot_of = torch.full((max(subset, default=-1) + 1,), -1, dtype=torch.long)
    slot_of[torch.tensor(subset, dtype=torch.long)] = torch.arange(len(subset))
    parts: list[Tensor] = []
    count = len(columns.get("index", []))
    for start in range(0, count, METRIC_CHUNK):
        part = {key: value[start : start + METRIC_CHUNK] for key, value in columns.items()}
        step = explain(
            explainer,
            part["activations"].to(device),
            part["output"].to(device),
            target,
            None,
            part["label"],
            "true",
            weighting,
            part["index"],
        )
        parts.append(step.maps)
    index = columns["index"].to(device) if count else torch.zeros(0, dtype=torch.long, device=device)
    maps = torch.cat(parts) if parts else torch.zeros(0, 1, 1, device=device)
    box = columns["box"].to(device, torch.float32) if count else torch.zeros(0, 4, device=device)
    if all_gather is not None and world_size > 1:
        # Ranks' grids agree; an empty rank's placeholder [0, 1, 1] must take the others' shape to join the gather.
        shape = all_gather(torch.tensor(maps.shape[1:] if count else (0, 0), device=device)).amax(0).tolist()
        if not count:
            maps = torch.zeros(0, *shape, device=device)
        index, maps, box = gather_unique(all_gather, world_size, index, maps, box)
    index = index.cpu()
    return {"slot": slot_of[index], "maps": maps.float().cpu(), "box": box.cpu()}


def score_maps(
    maps: dict[str, Tensor], num_slots: int, size: tuple[int, int], pool: ScorePool | None = None
) -> Scores | None:
    """The localization scores of :func:`subset_maps`' maps upsampled to ``size`` (the images'), in ``pool``'s
    worker processes where the maps are many enough to pay for them (``pays_off``), else here; the same function
    scores each chunk either way. None when no subset image was validated this epoch."""
    accumulator = LocalizationAccumulator(num_slots)
    chunks = [slice(start, start + METRIC_CHUNK) for start in range(0, len(maps["slot"]), METRIC_CHUNK)]
    if pool is not None and pays_off(len(maps["slot"]), size):
        futures = [pool.submit(maps["maps"][c], maps["box"][c], size) for c in chunks]
        for chunk, future in zip(chunks, futures):
            accumulator.add_rows(maps["slot"][chunk], future.result())
    else:
        for chunk in chunks:
            rows = score_rows(maps["maps"][chunk].numpy(), maps["box"][chunk].double().numpy(), size)
            accumulator.add_rows(maps["slot"][chunk], rows)
    return accumulator.compute() if accumulator.num_images else None
