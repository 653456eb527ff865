"""``cubcam evaluate``: how well a checkpoint's explanations localize the birds, and how faithful they are.

    cubcam evaluate CKPT [--split test|val|train] [--methods gradcam,gradcam++,...] [--faithfulness]
        [--sanity [N]] [--wandb]

Scores GradCAM (classifier) or EmbeddingCAM with the class-proxy schemes ``normalized_mean`` and
``single_point_random`` (embedding net), for every ``--methods``, for the true class of every image, side by
side with baselines on the same images: the centre Gaussian ("the bird is in the middle") and, with
``--faithfulness``, a random map drawn at the CAM layer's grid.

- Localization, through ``cubcam.cams.localization.LocalizationAccumulator`` (the training callback's): MaxBoxAccV2
  (mean over IoU 0.3/0.5/0.7 of the best-threshold box accuracy; Choe et al., CVPR 2020), box accuracy at IoU 0.5,
  heatmap ratio (CAM mass inside the GT box), pointing game (the peak inside the GT box, as the callback's
  ``val/cam_pointing_game``) and ``pointing_game_parts`` (the peak within 15 px of a visible part).
- Faithfulness (``--faithfulness``, ``cubcam.cams.faithfulness``): deletion and insertion AUC over ``--steps`` steps
  (pixels to the mean colour, most important first; onto a canvas blurred with sigma ``--blur`` of the image side)
  and Average Drop / Increase in Confidence (the image times its map), and ROAD (``cubcam.cams.road``: MoRF, LeRF
  and combined at ``--road-percentiles``, the pixels removed by noisy linear imputation), on a bounded score: the
  softmax probability of the class, or an embedding's cosine to its proxy clipped at 0.
- Sanity (``--sanity N``, ``cubcam.train.inspection.sanity``): the maps of N images as the model's layers are
  re-initialised from the head down and one block at a time, against the trained model's (Adebayo et al., NeurIPS
  2018): ``sanity`` in metrics.json, a section in metrics.md flagging a method that fails, ``sanity.png`` and
  ``sanity_maps.png``.

Writes ``metrics.json`` (sorted keys, floats rounded to 6 decimals: identical between runs; per method the scores,
the curves, and a per-class table), ``metrics.md`` (the table, then the classes worst-localized first), and beside
them ``box_accuracy.png`` (box accuracy against the CAM threshold per IoU) and ``deletion_insertion.png``; prints
the table. ``--wandb [PROJECT]`` logs the table and plots to a W&B run too. The splits are the checkpoint's own
(``val`` is the share of the training data its datamodule held out; a checkpoint without one has no ``val``).

Cost: localization is about one plain forward per image: each batch runs the backbone once with the target layer
hooked; every CAM is then a head-only forward and backward from those activations, and only small per-image rows are
kept, never the maps (ScoreCAM is a forward per channel and image, AblationCAM a head-only forward per channel and
image). Faithfulness adds ``2 * (steps - 1) + 1`` batched no-grad forwards per image and method (and two per batch
shared by all), and ROAD, per method and percentile, two sparse solves per image and two batched forwards. An
embedding net's proxies come from its reference split (train; in the zero_shot scheme the scored split itself), whose
embeddings are cached beside the checkpoint after the first run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Subset
from tqdm import tqdm

from cubcam.cams import minmax_normalize
from cubcam.cams.engine import DEFAULT_CHANNEL_BATCH
from cubcam.cams.faithfulness import (
    BLUR_SIGMA,
    CurveEnds,
    FaithfulnessAccumulator,
    blur,
    confidence_change,
    deletion_insertion,
    fractions,
    random_maps,
)
from cubcam.cams.files import WriteFailed, write_text
from cubcam.cams.localization import (
    DEFAULT_IOU_THRESHOLDS,
    DEFAULT_THRESHOLDS,
    LocalizationAccumulator,
    box_iou,
    boxes_from_map,
)
from cubcam.cams.methods import METHODS, Method
from cubcam.cams.overlay import IMAGENET_MEAN, IMAGENET_STD, denormalize
from cubcam.cams.protocol import (
    CAMModule,
    Choice,
    EvalMethod,
    Explainer,
    HeadExplainer,
    explain,
    explainer_for,
    features_for,
    finer_maps,
)
from cubcam.cams.road import ROAD_PERCENTILES, road
from cubcam.cams.targets import ExplanationTarget, ProxyScheme, Target, single_points
from cubcam.train.data.cub import SPLITS, CUBDataset, spread_indices
from cubcam.train.inspection.checkpoint import one_line
from cubcam.train.inspection.confusion import confused_section, write_confused
from cubcam.train.inspection.gallery import GalleryMaps, Tiles, cam_threshold, write_tiles
from cubcam.train.inspection.names import (
    FAITHFULNESS_NAMES,
    FINER,
    METRIC_NAMES,
    PER_CLASS_KEYS,
    method_name,
)
from cubcam.train.inspection.pages import command_line, evaluate_page, gallery_item
from cubcam.train.inspection.plots import box_accuracy_plot, faithfulness_plot, sanity_maps_figure, sanity_plot
from cubcam.train.inspection.reference import loader
from cubcam.train.inspection.report import Page, files_folder, render, tables_and_plots, write_page
from cubcam.train.inspection.sanity import SanityResult, blocks, sanity_check, sanity_report, sanity_table
from cubcam.train.inspection.session import (
    START_ERRORS,
    add_common_options,
    add_finer_option,
    fail,
    positive_int,
    start,
)

# An embedding net's methods, each keyed <method>/<scheme>: the class proxies (one per class, so the map of an
# image explains its class, as the WSOL metrics ask).
EVALUATE_SCHEMES: tuple[ProxyScheme, ...] = ("normalized_mean", "single_point_random")
BASELINES = ("random", "centre_gaussian")  # uninformed maps scored beside the methods (random: with faithfulness)
IOUS = DEFAULT_IOU_THRESHOLDS


def parse_methods(text: str) -> list[Method]:
    """``--methods gradcam,gradcam++``: the CAM methods to score, each once, in the order given."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"--methods takes a comma-separated list of {', '.join(METHODS)}; got {text!r}"
        )
    return list(dict.fromkeys(cast(list[Method], names)))


def parse_percentiles(text: str) -> list[float]:
    """``--road-percentiles 20,40,60,80`` (or ``none``): ROAD's percentiles, each in (0, 100)."""
    if text.strip().lower() == "none":
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 < v < 100 for v in values):
        raise argparse.ArgumentTypeError(f"--road-percentiles takes numbers in (0, 100), comma-separated; got {text!r}")
    return values


SANITY_IMAGES = 8  # --sanity without a number: enough for a mean correlation, 1 + 2 * blocks explanations each
DEFAULT_STEPS = 8  # deletion/insertion: 9 points; each step costs a forward of every image per method
GAUSSIAN_SIGMA = 0.25  # of the image side; the level sets (centred discs) and so the box metrics do not depend on it


def centre_gaussian(size: tuple[int, int], sigma: float = GAUSSIAN_SIGMA) -> Tensor:
    """An isotropic Gaussian centred on the image, min-max normalised to [0, 1]: the "bird in the middle" prior."""
    ys, xs = (torch.arange(n, dtype=torch.float32) + 0.5 - n / 2 for n in size)
    scale = sigma * min(size)
    g = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * scale**2))
    return minmax_normalize(g[None])[0]


class CentreBaseline:
    """The centre Gaussian and its MaxBoxAccV2 region boxes at every threshold, found once: the map is the same for
    every image, so per image only the IoUs with its GT box remain (``box_hits`` would redo the regions each time)."""

    def __init__(self, size: tuple[int, int]):
        self.map = centre_gaussian(size)
        self.regions = [boxes_from_map(self.map, t) for t in DEFAULT_THRESHOLDS]

    def box_hits(self, boxes: Tensor) -> Tensor:
        """Same as ``box_hits(map.expand(N, H, W), boxes)``: bool [N, T, I], on the boxes' device."""
        gt = boxes.double()[:, None]
        best = torch.stack([box_iou(gt, r[None]).amax(1) if len(r) else gt.new_zeros(len(gt)) for r in self.regions], 1)
        return best[:, :, None] >= torch.tensor(DEFAULT_IOU_THRESHOLDS, device=boxes.device)


@dataclass
class Scores:
    """What :func:`score_split` found: scalar scores and curves by method (baselines included), the image count,
    and each method's accumulator with the label of every slot, for the per-class table."""

    methods: dict[str, dict[str, float]]
    curves: dict[str, dict[str, list[float]]]
    num_images: int
    accumulators: dict[str, LocalizationAccumulator]
    labels: np.ndarray
    predicted: np.ndarray  # the predicted class of every slot (an embedding net's: its nearest class proxy)
    confidence: np.ndarray  # the predicted class's score of every slot (its probability, or cosine)


def score_split(
    module: CAMModule,
    batches: Iterable[dict[str, Tensor]],
    methods: dict[str, EvalMethod],
    device: torch.device,
    total: int,
    choice: Choice = "true",
    steps: int | None = None,
    seed: int = 0,
    blur_sigma: float = BLUR_SIGMA,
    progress: bool = True,
    road_percentiles: Sequence[float] = ROAD_PERCENTILES,
    channel_batch_size: int = DEFAULT_CHANNEL_BATCH,
    finer: int = 0,
    gallery: GalleryMaps | None = None,
) -> Scores:
    """Every method's scores, and the baselines', over the ``total`` images of ``batches`` (in order).

    Each batch runs the backbone once (``HeadExplainer.features_and_outputs``); each method's maps are then one
    explanation step from those features (ScoreCAM's from the images: ``explainer_for``), scored by one
    :class:`LocalizationAccumulator` per method (the callback's too). With ``steps``, also faithfulness
    (:mod:`cubcam.cams.faithfulness`): per method ``2 * (steps - 1) + 1`` batched no-grad forwards of perturbed
    images, plus two per batch shared by all (the blurred canvas, the substrate), and ROAD at ``road_percentiles``
    (:mod:`cubcam.cams.road`, its noise drawn from a generator seeded with ``seed``).
    The baselines (``centre_gaussian``, and with ``steps`` also ``random``, drawn from ``seed``) are scored with
    the first method's target, so they answer "what does an uninformed map get on this score".

    With ``finer`` (a number of rivals), each method over class scores (a classifier's, an embedding net's
    ``normalized_mean`` proxies) is scored a second time as Finer-CAM (key ``<method>+finer``): each image's class
    against its ``finer`` nearest rivals, one more backward per batch; its faithfulness perturbs the same confidence
    as the plain method's.

    The box metrics are labelled where the maps are (``cubcam.cams.localization.box_hits``: torch on an
    accelerator, NumPy on the CPU), and ROAD's imputation is solved there too. A ``gallery`` keeps each image's
    thumbnail and first method's map for the report's gallery.
    """
    head = HeadExplainer(module)
    explainers = {m: explainer_for(module, m, channel_batch_size) for _, m in methods.values()}
    workers = torch.get_num_threads()
    baselines = BASELINES if steps else ("centre_gaussian",)
    finer_of_method = {name: name + FINER for name, (target, _) in methods.items() if finer and has_classes(target)}
    names = [*methods, *finer_of_method.values(), *baselines]
    accumulators = {name: LocalizationAccumulator(total, workers=workers, device=device) for name in names}
    faithful = {name: FaithfulnessAccumulator(steps) for name in names} if steps else {}
    labels = np.full(total, -1, np.int64)
    predicted = np.full(total, -1, np.int64)
    confidence = np.full(total, np.nan)
    baseline: CentreBaseline | None = None
    generator = torch.Generator().manual_seed(seed)
    road_noise = torch.Generator().manual_seed(seed)
    seen = 0
    bar = tqdm(total=total, desc="evaluate", unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    with bar:
        for batch in batches:
            images = batch["image"].to(device, non_blocking=True)
            size = (images.shape[-2], images.shape[-1])
            activations, outputs = head.features_and_outputs(images)
            slots = range(seen, seen + len(images))
            labels[seen : seen + len(images)] = np.asarray(batch["label"])
            boxes, parts = batch["box"], batch["parts"]
            if baseline is None or tuple(baseline.map.shape) != size:
                baseline = CentreBaseline(size)
            maps: dict[str, tuple[Tensor, EvalMethod, Tensor]] = {}
            for name, (target, method) in methods.items():
                explainer = explainers[method]
                features = features_for(explainer, activations, images)
                step = explain(explainer, features, outputs, target, size, batch["label"], choice, method)
                if not maps:  # the first method's: every method predicts from the same outputs
                    predicted[seen : seen + len(images)] = step.predicted.cpu().numpy()
                    chosen = step.class_scores.gather(1, step.predicted[:, None].to(step.class_scores.device))
                    confidence[seen : seen + len(images)] = chosen[:, 0].float().cpu().numpy()
                    if gallery is not None:
                        gallery.add(slots, step.maps)
                maps[name] = (step.maps.float(), (target, method), step.rows)
                if name in finer_of_method:
                    finer_cams, _ = finer_maps(
                        explainer, features, outputs, target.target, size, step.explained, finer, method
                    )
                    maps[finer_of_method[name]] = (finer_cams.float(), (target, method), step.rows)
            first = next(iter(maps.values()))
            if steps:  # where it tells something; its many small regions would triple the cost of box metrics
                grid = (int(activations.shape[-2]), int(activations.shape[-1]))
                random = random_maps(len(images), grid, size, generator).to(device)
                maps["random"] = (random, first[1], first[2])
            maps["centre_gaussian"] = (baseline.map.to(device).expand(len(images), -1, -1), first[1], first[2])
            for name, (cams, _, _) in maps.items():
                hits = baseline.box_hits(boxes) if name == "centre_gaussian" else None  # known: nothing to label
                accumulators[name].update(slots, cams, boxes, parts, hits=hits)
            if steps:
                perturb(head, images, outputs, maps, faithful, steps, blur_sigma, road_percentiles, road_noise)
            seen += len(images)
            bar.update(len(images))
    scores: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    for name in names:
        localized = accumulators[name].compute()
        box_curve = np.asarray(localized["box_acc_curve"])
        curves[name] = {f"box_acc_iou{round(100 * t)}": box_curve[:, j].tolist() for j, t in enumerate(IOUS)}
        scores[name] = {k: float(cast(float, v)) for k, v in localized.items() if np.isscalar(v)}
        if name in faithful:
            result = faithful[name].compute()
            curves[name] |= {k: cast(list[float], result.pop(k)) for k in ("deletion_curve", "insertion_curve")}
            scores[name] |= {k: float(cast(float, v)) for k, v in result.items() if k != "num_images"}
    return Scores(scores, curves, seen, accumulators, labels, predicted, confidence)


def has_classes(target: ExplanationTarget) -> bool:
    """Whether a target's rows are the classes, which Finer-CAM ranks: a classifier's logits, or an embedding net's
    Normalized Mean Proxies (its single-point schemes explain one image's embedding)."""
    return target.scheme in (None, "normalized_mean")


def perturb(
    explainer: Explainer,
    images: Tensor,
    outputs: Tensor,
    maps: dict[str, tuple[Tensor, EvalMethod, Tensor]],
    faithful: dict[str, FaithfulnessAccumulator],
    steps: int,
    blur_sigma: float,
    road_percentiles: Sequence[float] = (),
    road_noise: torch.Generator | None = None,
) -> None:
    """Deletion/insertion curves, confidence changes and ROAD's changes (at ``road_percentiles``, noise drawn from
    ``road_noise``) of every map of a batch, into ``faithful``."""
    with torch.no_grad():
        canvas = blur(images, blur_sigma)
        canvas_outputs = explainer.outputs(canvas)
        substrate_outputs = explainer.outputs(torch.zeros_like(images[:1])).expand(len(images), -1)  # one grey image
        for name, (cams, (explained, _), rows) in maps.items():
            target = explained.target
            confidence = partial(_confidence, explainer, target, rows)
            base = target.confidence(outputs, rows)
            ends = CurveEnds(base, target.confidence(substrate_outputs, rows), target.confidence(canvas_outputs, rows))
            deletion, insertion = deletion_insertion(confidence, images, cams, steps, ends, canvas)
            drop, increase = confidence_change(confidence, images, cams, base)
            removed = None
            if road_percentiles:
                removed = road(confidence, images, cams, base, road_noise or torch.Generator(), road_percentiles)
            faithful[name].update(deletion, insertion, drop, increase, removed)


def _confidence(explainer: Explainer, target: Target, rows: Tensor, images: Tensor) -> Tensor:
    return target.confidence(explainer.outputs(images), rows)


def rounded(value: Any, digits: int = 6) -> Any:
    """Floats rounded (NaN -> None) all the way down, so that two runs write byte-identical JSON."""
    if isinstance(value, dict):
        return {str(k): rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, digits)
    return value


def measured_rows(methods: dict[str, dict[str, float]]) -> dict[str, list[float | None]]:
    """Each metric's label and its value by method, for the metrics measured for at least one method
    (faithfulness with ``--faithfulness``, ROAD unless ``--road-percentiles none``)."""
    names = METRIC_NAMES | FAITHFULNESS_NAMES
    rows = {label: [scores.get(key) for scores in methods.values()] for key, label in names.items()}
    return {label: values for label, values in rows.items() if any(value is not None for value in values)}


def markdown_table(methods: dict[str, dict[str, float]]) -> str:
    """Metrics as rows, methods as columns (in the given order: the baselines last), values in percent; a row only
    where it was measured (faithfulness with ``--faithfulness``, ROAD unless ``--road-percentiles none``)."""
    columns = list(methods)
    lines = [
        "| metric | " + " | ".join(method_name(m) for m in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for label, values in measured_rows(methods).items():
        lines.append(f"| {label} | " + " | ".join(_percent(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def per_class(scores: Scores, class_names: list[str]) -> dict[str, dict[str, Any]]:
    """Each class's localization scores by method (``PER_CLASS_KEYS``, the thresholds chosen within the class, as
    MaxBoxAccV2 chooses them within a split) and its image count, keyed by class name in label order."""
    table: dict[str, dict[str, Any]] = {}
    for label in np.unique(scores.labels[scores.labels >= 0]):
        slots = np.flatnonzero(scores.labels == label)
        row: dict[str, Any] = {"num_images": len(slots)}
        for name, accumulator in scores.accumulators.items():
            computed = accumulator.compute(slots)
            row[name] = {key: float(cast(float, computed[key])) for key in PER_CLASS_KEYS}
        table[class_names[int(label)]] = row
    return table


def per_class_table(classes: dict[str, dict[str, Any]], methods: list[str]) -> str:
    """The per-class table, the worst-localized class (by the first method's MaxBoxAccV2) first."""
    first = methods[0]
    order = sorted(classes, key=lambda name: (classes[name][first]["max_box_acc"], name))
    lines = [
        f"Per class, worst first by {method_name(first)} MaxBoxAccV2 (%):\n",
        "| class | images | " + " | ".join(f"{method_name(m)} MaxBoxAccV2" for m in methods) + " | "
        f"{method_name(first)} pointing game |",
        "|---|---:|" + "---:|" * (len(methods) + 1),
    ]
    for name in order:
        row = classes[name]
        cells = [_percent(row[m]["max_box_acc"]) for m in methods] + [_percent(row[first]["pointing_game"])]
        lines.append(f"| {markdown_text(name)} | {row['num_images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


MARKDOWN_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]|#"} | {"<": "&lt;", ">": "&gt;"})


def markdown_text(text: str) -> str:
    """``text`` (a class or file name) as literal Markdown: a ``|`` would end a table cell, HTML or backticks would
    render."""
    return str(text).translate(MARKDOWN_SPECIAL)


def terminal_table(methods: dict[str, dict[str, float]], width: int) -> str:
    """The metrics by method as plain text that fits ``width`` columns: the method keys as headers, as many
    columns as fit (the rest named in one line; metrics.md holds them all)."""
    rows = measured_rows(methods)
    first = max(len(label) for label in rows)
    shown: list[str] = []
    used = first
    for name in methods:
        cell = max(len(name), 6) + 2
        if used + cell > width and shown:
            break
        shown.append(name)
        used += cell
    header = " " * first + "".join(f"{name:>{max(len(name), 6) + 2}}" for name in shown)
    lines = [header]
    for label, values in rows.items():
        cells = "".join(f"{_percent(v):>{max(len(n), 6) + 2}}" for n, v in zip(shown, values))
        lines.append(f"{label:<{first}}{cells}")
    left = [name for name in methods if name not in shown]
    if left:
        lines.append(f"(and {', '.join(left)}: see metrics.md)")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cubcam evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_options(parser)
    parser.add_argument(
        "--split", choices=SPLITS, default="test", help="split to score (val: the one held out of the training data)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: <checkpoint folder>/<checkpoint name>-evaluate-<split>)",
    )
    parser.add_argument(
        "--methods",
        type=parse_methods,
        default=["gradcam"],
        help="comma-separated CAM methods to score side by side, of "
        f"{','.join(METHODS)} (scorecam: a forward per channel and image; embedding nets: each with the "
        f"proxy schemes {', '.join(EVALUATE_SCHEMES)})",
    )
    parser.add_argument(
        "--faithfulness",
        action="store_true",
        help="also score deletion/insertion AUC, Average Drop / Increase in Confidence (about "
        "2 * steps forwards per image and method) and ROAD (2 sparse solves per image, method and percentile)",
    )
    parser.add_argument(
        "--road-percentiles",
        type=parse_percentiles,
        default=list(ROAD_PERCENTILES),
        help="ROAD's percentiles, comma-separated in (0, 100), or 'none' for no ROAD (default: "
        f"{','.join(map(str, ROAD_PERCENTILES))})",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=DEFAULT_STEPS, help="deletion/insertion curve steps (points: steps + 1)"
    )
    parser.add_argument(
        "--blur",
        type=float,
        default=BLUR_SIGMA,
        help="insertion canvas: Gaussian blur sigma as a fraction of the shorter image side (default %(default)s)",
    )
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="score only this many images, spread over the split"
    )
    add_finer_option(
        parser,
        "also score each method as Finer-CAM, and write the most confused pairs with the maps that tell them apart",
    )
    parser.add_argument(
        "--sanity",
        type=positive_int,
        nargs="?",
        const=SANITY_IMAGES,
        default=None,
        metavar="N",
        help=f"also run the model-randomisation sanity check on N images (default {SANITY_IMAGES}) spread over the "
        "split (per method 1 + 2 * blocks explanations of them, each a forward and backward of the whole model)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns what it wrote to metrics.json."""
    args = parse_args(argv)
    try:
        session = start(args)
        dataset = session.dataset(args.split)
        reference = session.reference(args.split)
    except START_ERRORS as err:
        fail(err)
    module, settings, split = session.ckpt.module, session.settings, args.split
    scored: CUBDataset | Subset[Any] = dataset
    if args.limit is not None:
        scored = Subset(dataset, spread_indices(len(dataset), args.limit))

    report: dict[str, Any] = {
        "checkpoint": session.ckpt.path.name,
        "kind": module.cam_kind,
        "split": split,
        "split_scheme": settings["split_scheme"],
        "val_fraction": settings["val_fraction"],
        "split_seed": settings["seed"],
        "image_size": session.image_size,
        "target": args.target,
        "baseline_sigma": GAUSSIAN_SIGMA,
    }
    # By proxy scheme (None: a classifier's logits).
    targets: dict[ProxyScheme | None, ExplanationTarget] = {None: session.target("normalized_mean", None, split)}
    if reference is not None:
        targets = {scheme: session.target(scheme, reference, split) for scheme in EVALUATE_SCHEMES}
        picks = single_points(reference.embeddings, reference.labels, reference.num_classes, args.seed)[1]
        report |= {
            "reference_split": reference.split,
            "single_point_seed": args.seed,
            "single_point_reference_indices": picks.tolist(),
        }

    batches = loader(scored, args.batch_size, args.num_workers)
    methods: dict[str, EvalMethod] = {
        m if scheme is None else f"{m}/{scheme}": (target, m)
        for m in args.methods
        for scheme, target in targets.items()
    }
    report["methods_asked"] = list(args.methods)  # --methods as given (the scores' keys are sorted in the file)
    steps = args.steps if args.faithfulness else None
    gallery = GalleryMaps(len(scored))
    scores = score_split(
        module,
        batches,
        methods,
        session.device,
        len(scored),
        args.target,
        steps,
        args.seed,
        args.blur,
        road_percentiles=args.road_percentiles,
        channel_batch_size=args.channel_batch_size,
        finer=args.finer,
        gallery=gallery,
    )
    first = next(iter(methods))
    classes = per_class(scores, dataset.class_names)
    report |= {
        "num_images": scores.num_images,
        "methods": scores.methods,
        "curves": scores.curves,
        "thresholds": DEFAULT_THRESHOLDS.tolist(),
        "per_class": classes,
    }
    if steps:
        report |= {"faithfulness_steps": steps, "fractions": fractions(steps).tolist(), "blur_sigma": args.blur}
        if args.road_percentiles:
            report["road_percentiles"] = list(args.road_percentiles)
    sanity = None
    if args.sanity:
        sanity = run_sanity(
            module, Subset(dataset, spread_indices(len(dataset), args.sanity)), methods, session.device, args
        )
        report["sanity"] = sanity_report(sanity, min(args.sanity, len(dataset)))
    report = rounded(report)
    out = args.out or session.ckpt.path.with_name(f"{session.ckpt.path.stem}-evaluate-{split}")
    try:  # a full disk, a read-only folder: one line, not a traceback
        out.mkdir(parents=True, exist_ok=True)
        plots = write_plots(report, out, sanity, (dataset.mean, dataset.std))
        if args.finer:
            target, method = methods[first]
            report["confused_pairs"] = write_confused(
                out, module, target, method, scored, scores.labels, scores.predicted, session.device,
                args.channel_batch_size,
            )  # fmt: skip
            report["finer_rivals"] = args.finer
        write_text(out / "metrics.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
        heading = (
            f"{markdown_text(session.ckpt.path.name)} on the {split} split ({scores.num_images} images, "
            f"{session.image_size} px), in %:\n\n"
        )
        baselines = [name for name in BASELINES if name in scores.methods]
        checked = "" if sanity is None else "\n" + sanity_table(report["sanity"], method_name)
        confused = confused_section(report["confused_pairs"], markdown_text) if args.finer else ""
        text = heading + markdown_table(report["methods"]) + "\n" + per_class_table(classes, [first, *baselines])
        write_text(out / "metrics.md", text + checked + confused)
        command = command_line(argv, "cubcam evaluate")
        page = evaluate_report(out, report, first, scores, gallery, dataset, scored, plots, command, args.num_workers)
        write_page(out / "report.html", page)
    except (WriteFailed, PermissionError) as err:
        fail(err)
    width = shutil.get_terminal_size().columns
    print(f"{session.ckpt.path.name} on the {split} split ({scores.num_images} images), in %:")
    print(terminal_table(report["methods"], width) + checked)
    for pair in report.get("confused_pairs", []):
        print(f"most confused: {' and '.join(pair['classes'])} ({pair['count']} image(s)): {out / pair['figure']}")
    print(
        f"wrote {out / 'metrics.json'}, {out / 'metrics.md'} (with the per-class table), "
        + ", ".join(p.name for p in plots)
        + f"; open {out / 'report.html'} in a browser"
    )
    if args.wandb:
        log_to_wandb(args.wandb, report, text, plots, out, page)
    return report


def evaluate_report(
    out: Path,
    report: dict[str, Any],
    first: str,
    scores: Scores,
    gallery: GalleryMaps,
    dataset: CUBDataset,
    scored: CUBDataset | Subset[Any],
    plots: list[Path],
    command: str,
    num_workers: int = 0,
) -> Page:
    """The page of ``report.html``, its gallery's thumbnails written (``report_files/``, drawn in ``num_workers``
    processes): every image by the ``first`` method's map, its CAM box cut at the threshold where box accuracy at
    IoU 0.5 is best."""
    threshold = cam_threshold(report["methods"][first])
    tiles = Tiles(scored, [(gallery.maps, threshold)], (dataset.mean, dataset.std))
    with files_folder(out) as folder:
        (ious,) = write_tiles([folder], tiles, num_workers)
    accumulator = scores.accumulators[first]
    peaks = (accumulator.rows[:, accumulator.num_hits + 1] / accumulator.rows[:, -1].clamp_min(1)).cpu().tolist()
    indices = list(scored.indices) if isinstance(scored, Subset) else list(range(len(scored)))
    names = dataset.class_names
    items = [
        gallery_item(
            slot,
            dataset.image_path(index).name,
            names[int(scores.labels[slot])],
            names[int(scores.predicted[slot])],
            float(scores.confidence[slot]),
            ious[slot],
            peaks[slot] > 0.5 if ious[slot] is not None else None,
        )
        for slot, index in enumerate(indices[: scores.num_images])
    ]
    return evaluate_page(report, first, threshold, plots, items, command)


def run_sanity(
    module: CAMModule,
    images: Subset[Any],
    methods: dict[str, EvalMethod],
    device: torch.device,
    args: argparse.Namespace,
) -> SanityResult:
    """The sanity check of every method on ``images`` (one batch), with a progress bar over its steps."""
    batch = next(iter(loader(images, len(images), args.num_workers)))
    steps = 2 * len(blocks(cast(torch.nn.Module, module)))
    with tqdm(total=steps, desc="sanity", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        pixels = batch["image"].to(device)
        return sanity_check(module, pixels, batch["label"], methods, args.seed, bar.update, args.channel_batch_size)


def write_plots(
    report: dict[str, Any],
    out: Path,
    sanity: SanityResult | None = None,
    normalisation: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
) -> list[Path]:
    """The box-accuracy plot, the deletion/insertion plot when faithfulness was measured, and the sanity check's
    curves and one image's maps through its cascade (the image de-normalised with ``normalisation``: mean, std),
    beside metrics.md."""
    curves, labels = report["curves"], {name: method_name(name) for name in report["methods"]}
    plots = [box_accuracy_plot(curves, report["thresholds"], list(IOUS), labels, out / "box_accuracy.png")]
    if "fractions" in report:
        plots.append(faithfulness_plot(curves, report["fractions"], labels, out / "deletion_insertion.png"))
    if sanity is not None:
        checked = report["sanity"]
        labels = {name: method_name(name) for name in checked["cascade"]}
        plots.append(sanity_plot(checked, labels, out / "sanity.png"))
        maps = {name: [m.numpy() for m in series] for name, series in sanity.first_maps.items()}
        image = denormalize(cast(Tensor, sanity.first_image), *normalisation)
        plots.append(sanity_maps_figure(image, maps, checked["blocks"], labels, out / "sanity_maps.png"))
    return plots


def log_to_wandb(
    project: str, report: dict[str, Any], text: str, plots: list[Path], out: Path, page: Page | None = None
) -> None:
    """The scores (a table, and the run summary), the plots and the report's tables and plots (``evaluate/report``,
    an HTML panel) as one W&B run of ``project`` (job type ``evaluate``). A W&B failure is one warning: the files
    on disk are the result and are already written."""
    try:
        import wandb

        run = wandb.init(
            project=project,
            job_type="evaluate",
            name=f"evaluate-{Path(report['checkpoint']).stem}-{report['split']}",
            dir=str(out),
            config={
                k: v for k, v in report.items() if k not in ("methods", "curves", "per_class", "fractions", "sanity")
            },
        )
        try:
            keys = sorted({key for scores in report["methods"].values() for key in scores})
            table = wandb.Table(
                columns=["method", *keys],
                data=[[name, *(scores.get(k) for k in keys)] for name, scores in report["methods"].items()],
            )
            images: dict[str, Any] = {f"evaluate/{p.stem}": wandb.Image(str(p)) for p in plots}
            if page is not None:
                images["evaluate/report"] = wandb.Html(render(tables_and_plots(page, out)), inject=False)
            run.log({"evaluate/metrics": table, **images})
            run.summary.update(
                {f"{name}/{k}": v for name, scores in report["methods"].items() for k, v in scores.items()}
            )
            if "sanity" in report:  # the rank correlation after the full cascade, the check's verdict
                cascade = report["sanity"]["cascade"].items()
                run.summary.update({f"sanity/{name}/rank_correlation": c["spearman"][-1] for name, c in cascade})
        finally:
            run.finish()
        print(f"logged to W&B: project {project}, run {run.id}")
    except Exception as err:  # the evaluation is done and written: a dashboard failure must not hide it
        print(f"warning: could not log to W&B ({one_line(err)}); the results are in {out}", file=sys.stderr)
