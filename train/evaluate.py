"""``cubcam evaluate``: how well a checkpoint's explanations localize the birds, over a whole split.

    cubcam evaluate CKPT [--data.root DIR] [--split test] [--out DIR]

Scores GradCAM (classifier) or EmbeddingCAM with both proxy schemes (embedding net) for the true class of every
image, side by side with a centre-Gaussian baseline on the same images (the score of "the bird is in the middle"):
MaxBoxAccV2 (mean over IoU 0.3/0.5/0.7 of the best-threshold box accuracy; Choe et al., CVPR 2020), box accuracy at
IoU 0.5 (best threshold), heatmap ratio (CAM mass inside the GT box), pointing game (the CAM's peak lies in the GT
box, as the training callback's ``val/cam_pointing_game``) and ``pointing_game_parts`` (the peak lies within 15 px
of a visible part), all through ``cubcam.cams.localization.LocalizationAccumulator``, the callback's accumulator.
Writes ``metrics.json`` (sorted keys, floats rounded to 6 decimals: identical between runs) and ``metrics.md``, and
prints the table.

Cost: about one plain forward per image. Each batch runs the backbone once with the target layer hooked; every CAM
(one per proxy scheme) is then a head-only forward and backward from those activations, and only the per-image
results (one small row per image) are kept, never the maps. An embedding net's proxies come from its reference split
(train; test in the zero_shot scheme), whose embeddings are cached beside the checkpoint after the first run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Subset
from tqdm import tqdm

from cubcam.cams import minmax_normalize
from cubcam.cams.engine import Weighting
from cubcam.cams.localization import (
    DEFAULT_IOU_THRESHOLDS,
    DEFAULT_THRESHOLDS,
    LocalizationAccumulator,
    box_iou,
    boxes_from_map,
)
from cubcam.cams.protocol import CAMModule, Choice, explain, features_and_outputs
from cubcam.cams.targets import ClassLogits, Target
from cubcam.train.checkpoint import CheckpointError, load_checkpoint, one_line
from cubcam.train.data.cub import CUBDataset
from cubcam.train.data.presets import EvalPreset
from cubcam.train.explain import SPLITS, spread_indices
from cubcam.train.reference import loader, reference_set, reference_split

WEIGHTING_NAMES = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAM++",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
}
EvalMethod = tuple[Target, Weighting]  # what a map explains, and how the gradients weight it


def method_name(key: str) -> str:
    """The table's column title of a method key: ``gradcam++`` (a classifier's), ``gradcam++/normalized_mean`` (an
    embedding net's: weighting / proxy scheme) or ``centre_gaussian``."""
    if key == "centre_gaussian":
        return "centre Gaussian (baseline)"
    weighting, _, scheme = key.partition("/")
    if not scheme:
        return WEIGHTING_NAMES[weighting]
    by = "" if weighting == "gradcam" else f", {WEIGHTING_NAMES[weighting]} weighting"
    return f"EmbeddingCAM{by} ({scheme.replace('_', ' ')} proxy)"


def parse_weightings(text: str) -> list[Weighting]:
    """``--weightings gradcam,gradcam++``: the CAM family's weightings to score, each once, in the order given."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in get_args(Weighting)]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"--weightings takes a comma-separated list of {', '.join(get_args(Weighting))}; got {text!r}"
        )
    return list(dict.fromkeys(cast(list[Weighting], names)))


METRIC_NAMES = {
    "max_box_acc": "MaxBoxAccV2",
    "box_acc_iou50": "box accuracy @ IoU 0.5",
    "heatmap_ratio": "heatmap ratio (mass in box)",
    "pointing_game": "pointing game (peak in box)",
    "pointing_game_parts": "pointing game (visible parts)",
}
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

    def box_hits(self, boxes: Tensor) -> np.ndarray:
        """Same as ``box_hits(map.expand(N, H, W), boxes)``: bool [N, T, I]."""
        gt = np.asarray(boxes, dtype=np.float64)[:, None]
        best = np.stack([box_iou(r[None], gt).max(1) if len(r) else np.zeros(len(gt)) for r in self.regions], 1)
        return best[:, :, None] >= np.asarray(DEFAULT_IOU_THRESHOLDS)


def localization_scores(
    module: CAMModule,
    batches: Iterable[dict[str, Tensor]],
    methods: dict[str, EvalMethod],
    device: torch.device,
    total: int,
    choice: Choice = "true",
    progress: bool = True,
) -> tuple[dict[str, dict[str, Any]], int]:
    """Every method's scores, and the centre Gaussian's, over the ``total`` images of ``batches`` (in order); and
    the image count.

    Each batch runs the backbone once (``features_and_outputs``); each method's maps are then one explanation step
    from those activations, scored by one :class:`LocalizationAccumulator` per method (the callback's too).
    """
    workers = torch.get_num_threads()
    accumulators = {name: LocalizationAccumulator(total, workers=workers) for name in [*methods, "centre_gaussian"]}
    baseline: CentreBaseline | None = None
    seen = 0
    bar = tqdm(total=total, desc="evaluate", unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    with bar:
        for batch in batches:
            images = batch["image"].to(device, non_blocking=True)
            size = (images.shape[-2], images.shape[-1])
            activations, outputs = features_and_outputs(module, images)
            slots = range(seen, seen + len(images))
            boxes, parts = batch["box"], batch["parts"]
            for name, (target, weighting) in methods.items():
                step = explain(module, activations, outputs, target, size, batch["label"], choice, weighting)
                accumulators[name].update(slots, step.maps.float().cpu(), boxes, parts)
            if baseline is None or tuple(baseline.map.shape) != size:
                baseline = CentreBaseline(size)
            accumulators["centre_gaussian"].update(
                slots, baseline.map.expand(len(images), -1, -1), boxes, parts, hits=baseline.box_hits(boxes)
            )
            seen += len(images)
            bar.update(len(images))
    scores = {name: {k: v for k, v in acc.compute().items() if np.isscalar(v)} for name, acc in accumulators.items()}
    return scores, seen


def rounded(value: Any, digits: int = 6) -> Any:
    """Floats rounded (NaN -> None) all the way down, so that two runs write byte-identical JSON."""
    if isinstance(value, dict):
        return {str(k): rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, digits)
    return value


def markdown_table(methods: dict[str, dict[str, float]]) -> str:
    """Metrics as rows, methods as columns (the baseline last), values in percent."""
    columns = [m for m in methods if m != "centre_gaussian"] + ["centre_gaussian"]
    lines = [
        "| metric | " + " | ".join(method_name(m) for m in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for key, label in METRIC_NAMES.items():
        values = [methods[m].get(key) for m in columns]
        cells = ["n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}" for v in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cubcam evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="a Lightning checkpoint of a cubcam Classifier or EmbeddingNet")
    parser.add_argument(
        "--data.root", dest="data_root", default=None, help="dataset root (default: the one saved in the checkpoint)"
    )
    parser.add_argument("--data.split_scheme", dest="split_scheme", choices=("official", "zero_shot"), default=None)
    parser.add_argument("--split", choices=sorted(SPLITS), default="test", help="split to score (val = test)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: <checkpoint folder>/<checkpoint name>-evaluate-<split>)",
    )
    parser.add_argument("--target", choices=("true", "predicted"), default="true", help="class whose CAM is scored")
    parser.add_argument(
        "--weightings",
        type=parse_weightings,
        default=["gradcam"],
        help="comma-separated CAM weightings to score side by side, e.g. gradcam,gradcam++,hirescam,"
        "xgradcam,layercam (embedding nets: each with both proxy schemes)",
    )
    parser.add_argument(
        "--reference-split",
        choices=("train", "test"),
        default=None,
        help="embedding nets: split whose embeddings give the proxies (default: train; test in the zero_shot scheme)",
    )
    parser.add_argument("--seed", type=int, default=0, help="draws the single-point proxy of each class")
    parser.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's data.image_size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="score only this many images, spread over the split")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-cache", action="store_true", help="recompute the reference embeddings")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns what it wrote to metrics.json."""
    args = parse_args(argv)
    device = torch.device(args.device)
    try:
        ckpt = load_checkpoint(args.checkpoint, map_location=device)
        root = args.data_root or ckpt.data_hparams.get("root")
        if root is None or not Path(root).exists():
            raise CheckpointError(f"dataset {root or '(none saved in the checkpoint)'} not found; pass --data.root")
        split_scheme = args.split_scheme or ckpt.split_scheme
        image_size = args.image_size or ckpt.image_size
        split = SPLITS[args.split]
        ref_split = reference_split(split_scheme, args.reference_split)
        dataset = CUBDataset(root, split=split, split_scheme=split_scheme, transform=EvalPreset(image_size))
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    module = ckpt.module
    if args.limit is not None:
        dataset = Subset(dataset, spread_indices(len(dataset), args.limit))

    report: dict[str, Any] = {
        "checkpoint": ckpt.path.name,
        "method": module.cam_method,
        "split": split,
        "split_scheme": split_scheme,
        "image_size": image_size,
        "target": args.target,
        "baseline_sigma": GAUSSIAN_SIGMA,
    }
    targets: dict[str | None, Target] = {None: ClassLogits()}  # by proxy scheme (None: a classifier's logits)
    if module.cam_method == "embeddingcam":
        reference = reference_set(
            module,
            ckpt.path,
            root,
            split=ref_split,
            split_scheme=split_scheme,
            image_size=image_size,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=device,
            cache=not args.no_cache,
        )
        targets = dict[str | None, Target](reference.targets(args.seed))
        report |= {
            "reference_split": ref_split,
            "single_point_seed": args.seed,
            "single_point_reference_indices": reference.single_point_proxies(args.seed)[1].tolist(),
        }

    batches = loader(dataset, args.batch_size, args.num_workers)
    methods: dict[str, EvalMethod] = {
        w if scheme is None else f"{w}/{scheme}": (target, w)
        for w in args.weightings
        for scheme, target in targets.items()
    }
    report["weightings"] = list(args.weightings)
    scores, num_images = localization_scores(module, batches, methods, device, len(dataset), args.target)
    report |= {"num_images": num_images, "methods": scores}
    report = rounded(report)
    table = markdown_table(scores)
    out = args.out or ckpt.path.with_name(f"{ckpt.path.stem}-evaluate-{split}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    heading = f"{ckpt.path.name} on the {split} split ({num_images} images, {image_size} px), in %:\n\n"
    (out / "metrics.md").write_text(heading + table)
    print(heading + table + f"\nwrote {out / 'metrics.json'} and {out / 'metrics.md'}")
    return report
