"""The loop's side of a panel epoch: everything here runs on the training loop's thread at a validation epoch's end,
on the module's device, on every rank.

:func:`epoch_maps` turns one epoch's collected rows (``collect.py``) into the metric subset's maps and their box
metrics (``cubcam.cams.localization.LocalizationAccumulator`` on the device, its rows summed over the ranks), the
panel's maps at the layer's grid and the evolution's thumbnails; what is left to draw goes to the picture thread
as a :class:`~cubcam.callbacks.picture_thread.PanelJob`. No Lightning here: the collectives are passed in, and every
rank joins them in the same order (an empty rank too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

from cubcam.callbacks.collect import Collate, EpochCollector, Outputs, load_birds
from cubcam.callbacks.evolution import Frame, frame_of
from cubcam.callbacks.options import PanelOptions
from cubcam.callbacks.panel_render import Style, class_inputs, neighbour_inputs
from cubcam.callbacks.panel_select import spread_over_classes
from cubcam.callbacks.picture_thread import Layout, PanelJob
from cubcam.callbacks.sources import normalization
from cubcam.cams.distributed import AllGather
from cubcam.cams.engine import isolated
from cubcam.cams.localization import LocalizationAccumulator
from cubcam.cams.protocol import Explainer, explain, upsample
from cubcam.cams.targets import ExplanationTarget, make_target

METRIC_KEYS = {  # logged key -> LocalizationAccumulator key
    "val/cam_max_box_acc": "max_box_acc",
    "val/cam_box_acc_iou50": "box_acc_iou50",
    "val/cam_heatmap_ratio": "heatmap_ratio",
    "val/cam_pointing_game": "pointing_game",  # the peak inside the GT box
}
METRIC_CHUNK = 64  # subset images per explanation and box-metric batch
CAM_BOX_THRESHOLD = 0.5  # where the panel's CAM box is cut until the metrics find the best IoU-0.5 threshold
NO_OUTPUTS = Outputs(torch.zeros(0, dtype=torch.long), torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))


@dataclass(frozen=True)
class Collectives:
    """The process group's collectives (Lightning's strategy's, or the identity on one process)."""

    all_gather: AllGather  # [...] of this rank -> [world_size, ...]
    reduce_sum: Callable[[Tensor], Tensor]
    world_size: int = 1
    is_zero: bool = True  # this is the rank that draws


@dataclass
class Epoch:
    """What the loop's thread needs to know of the epoch it is in."""

    number: int
    step: int  # of the epoch's val/* metrics
    dataset: Any  # the validation dataset (map-style)
    names: list[str]  # the class names
    device: torch.device
    collate: Collate = default_collate  # the validation loader's: makes a batch of dataset items


@dataclass
class EpochMaps:
    """An epoch's results: the same ``metrics`` and ``panel`` on every rank; ``job`` and ``frame`` on rank zero."""

    metrics: dict[str, float] | None = None  # METRIC_KEYS' keys; None: no subset image was measured
    non_finite: int = 0  # metric images whose maps are not finite (a diverged model): the metrics are NaN
    measured: int = 0  # metric images measured
    panel: list[int] | None = None  # the panel's dataset indices (chosen this epoch where it had none)
    job: PanelJob | None = None
    frame: Frame | None = None
    problems: list[str] = field(default_factory=list)  # warnings of this epoch (rank zero)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (what, message) to tell once a run (rank zero)


def epoch_maps(
    options: PanelOptions,
    explainer: Explainer,
    collected: EpochCollector,
    collectives: Collectives,
    epoch: Epoch,
) -> EpochMaps:
    """The maps and metrics of one validation epoch (module doc), with ``collected.panel`` the panel (None: chosen
    here, spread over the classes the epoch saw) and ``collected.subset`` the metric subset (sorted)."""
    result = EpochMaps(panel=collected.panel)
    device = epoch.device
    with isolated(device):
        outputs = collected.gathered_outputs(collectives.all_gather, collectives.world_size, device) or NO_OUTPUTS
        captured = collected.gathered_panel(collectives.all_gather, collectives.world_size, device)
        if result.panel is None and len(outputs.index):
            generator = torch.Generator().manual_seed(options.seed)
            chosen = spread_over_classes(outputs.label.tolist(), options.num_images, generator)
            result.panel = outputs.index[chosen].tolist()
        # an embedding net's proxies come from the epoch's own validation embeddings (all ranks', each once)
        target = make_target(
            explainer.cam_kind,
            options.proxy,
            outputs.output,
            outputs.label,
            len(epoch.names),
            seed=options.seed,
            index=outputs.index,
            score=options.score,
        )
        scores = None
        if collected.subset and collected.has_boxes:
            scores = _measure(options, explainer, collected, collectives, target, device)
        if scores is not None:
            result.non_finite, result.measured = int(scores.get("non_finite_images", 0)), int(scores["num_images"])
            result.metrics = {key: float(scores[name]) for key, name in METRIC_KEYS.items()}
        if not collectives.is_zero:
            return result
        _tell(options, collected, result, epoch.number)
        threshold = CAM_BOX_THRESHOLD
        if scores is not None and not result.non_finite:
            threshold = float(scores["best_threshold_iou50"])
        style = Style(options.colormap, options.alpha, threshold)
        try:
            result.job, result.frame = _panel(options, explainer, captured, target, epoch, result.panel, style)
        except (MemoryError, torch.cuda.OutOfMemoryError) as err:  # training goes on without this panel
            result.problems.append(f"could not render the panel of epoch {epoch.number}: {type(err).__name__}: {err}")
    return result


def _tell(options: PanelOptions, collected: EpochCollector, result: EpochMaps, epoch: int) -> None:
    """What the run is told about this epoch's data and maps."""
    if options.log_metrics and collected.subset and not collected.has_boxes:
        result.notes.append(
            (
                "no boxes",
                f"the validation data has no {options.format.box_key!r} boxes: the panel is drawn without boxes and "
                f"the CAM localization metrics are skipped",
            )
        )
    elif options.log_metrics and collected.subset and result.metrics is None:
        result.problems.append("no image of the metric subset was validated this epoch; CAM metrics skipped")
    invalid = collected.invalid_boxes
    if invalid:
        result.notes.append(
            (
                "invalid boxes",
                f"{len(invalid)} validation image(s) have a box that is not finite or has no width or height "
                f"(dataset indices {invalid[:5]}): left out of the CAM metrics",
            )
        )
    if result.non_finite:
        result.notes.append(
            (
                "diverged",
                f"training diverged at epoch {epoch}: the CAM maps of {result.non_finite} of {result.measured} metric "
                f"images are not finite, so the CAM metrics are NaN",
            )
        )


def _measure(
    options: PanelOptions,
    explainer: Explainer,
    collected: EpochCollector,
    collectives: Collectives,
    target: ExplanationTarget,
    device: torch.device,
) -> dict[str, Any] | None:
    """The metric subset's scores over every rank (None where no rank validated a subset image): each rank scores
    its rows on the device, the accumulator's rows are summed over the ranks, every rank computes the same scores."""
    subset = torch.tensor(collected.subset, dtype=torch.long)  # sorted: an image's slot is its position here
    columns = collected.take_subset_columns()
    accumulator = LocalizationAccumulator(len(subset), device=device)
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
            options.method,
            part["index"],
        )
        maps = upsample(step.maps, collected.image_size)
        slots = torch.searchsorted(subset.to(part["index"].device), part["index"])
        accumulator.update(slots.cpu().numpy(), maps, part["box"])
    if collectives.world_size > 1:
        accumulator.merge(collectives.reduce_sum)
    return accumulator.compute() if accumulator.num_images else None


def _panel(
    options: PanelOptions,
    explainer: Explainer,
    captured: dict[str, Tensor] | None,
    target: ExplanationTarget,
    epoch: Epoch,
    panel: list[int] | None,
    style: Style,
) -> tuple[PanelJob, Frame]:
    """The panel's maps at the layer's grid (the picture thread's job) and the evolution's thumbnails."""
    if not panel:
        raise RuntimeError("no panel was chosen (the validation run saw no images)")
    device, fmt = epoch.device, options.format
    birds = (
        dict(captured)
        if captured is not None
        else load_birds(epoch.dataset, panel, explainer, device, fmt, epoch.collate)
    )
    layout: Layout = "class"
    if target.neighbours and target.reference_index is not None:
        rows = target.rows(birds["label"], birds["output"], birds["index"])
        nearest = target.reference_index[rows.cpu()].tolist()
        inputs = neighbour_inputs(
            explainer, birds, load_birds(epoch.dataset, nearest, explainer, device, fmt, epoch.collate), options.method
        )
        layout, primary = "neighbour", inputs["maps"]
    else:
        inputs = class_inputs(explainer, birds, target, options.target, options.method, options.finer)
        primary = inputs["primary"]
    mean, std = normalization(epoch.dataset, int(birds["image"].shape[-3]))
    frame = frame_of(epoch.number, inputs, primary, (mean, std), style.box_threshold)
    job = PanelJob(
        epoch.number,
        epoch.step,
        inputs,
        layout,
        options.target,
        target.target.score_name,
        epoch.names,
        (mean, std),
        style,
    )
    return job, frame
