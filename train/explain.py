"""``cubcam explain``: what a trained checkpoint looks at, on your images, on a dataset panel, or in a retrieval.

    cubcam explain CKPT bird.jpg photo.png --out explained/           # your images (any size, any mode)
    cubcam explain CKPT --split val --num 16 --out explained/         # a panel of the dataset (true class, GT box)
    cubcam explain CKPT --query bird.jpg --topk 5 --out retrieval/    # an embedding net's nearest neighbours

Every image goes through the evaluation preset (shorter side to ``size * 256/224``, centre crop ``size``), so the
model sees exactly what it saw in validation; each overlay PNG is that ``size x size`` crop with the heatmap on it.
A classifier is explained with GradCAM, an embedding net with EmbeddingCAM against a class proxy built from the
reference split's embeddings (cached beside the checkpoint after the first run). Writes one overlay per image
(``NN_<name>.png``), ``grid.png`` (captioned tiles; GT box green and CAM box red where a box is known) and
``summary.json``. An image that cannot be read is reported in one line and skipped; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, get_args

import numpy as np
import torch
from torch import Tensor

from cubcam.cams import overlay, single_point_proxy
from cubcam.cams.engine import Weighting
from cubcam.cams.figure import grid, save_png
from cubcam.cams.overlay import denormalize
from cubcam.cams.protocol import UNKNOWN_LABEL, CAMModule, Choice, explain, features_and_outputs, head_cams
from cubcam.cams.targets import ClassLogits, Method, Proxies, Target
from cubcam.train.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, one_line
from cubcam.train.data.cub import SPLITS, CUBDataset
from cubcam.train.data.presets import EvalPreset, load_rgb
from cubcam.train.reference import ReferenceSet, reference_set, reference_split

# --- inputs -------------------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One image to explain: its source, the preset's tensor, and what the dataset knows about it (if anything)."""

    source: str
    image: Tensor
    label: int | None = None
    box: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_user_image(path: str | Path, preset: EvalPreset) -> Tensor:
    """A user's image file through the evaluation preset; any size, any mode (grayscale, palette, alpha)."""
    pil = load_rgb(path)
    width, height = pil.size
    image, _, _ = preset(pil, torch.tensor([0.0, 0.0, width, height]), torch.zeros(15, 3))
    return image


def spread_indices(total: int, num: int) -> list[int]:
    """``num`` indices spread evenly over ``range(total)``: CUB is sorted by class, so a panel shows many classes."""
    if total == 0:
        return []
    return sorted({int(i) for i in np.linspace(0, total - 1, min(num, total)).round()})


def dataset_item(dataset: CUBDataset, index: int, split: str) -> Item:
    sample = dataset[index]
    return Item(
        source=f"{split}[{index}]",
        image=sample["image"],
        label=int(sample["label"]),
        box=sample["box"],
        extra={"index": index, "image_id": int(sample["image_id"]), "path": str(dataset.image_path(index))},
    )


# --- explanation ---------------------------------------------------------------------------------------------------


@dataclass
class Explainer:
    """What a run of ``explain`` needs to turn images into maps and records: one step of
    ``cubcam.cams.protocol.explain`` per batch."""

    module: CAMModule
    target: Target  # class logits, or the reference split's class proxies
    choice: Choice  # "true" (where an image has a label) or "predicted"
    class_names: list[str]
    device: torch.device
    weighting: Weighting = "gradcam"

    def __call__(self, items: list[Item]) -> tuple[Tensor, list[dict[str, Any]]]:
        images = torch.stack([item.image for item in items]).to(self.device)
        activations, outputs = features_and_outputs(self.module, images)
        labels = torch.tensor([UNKNOWN_LABEL if item.label is None else item.label for item in items])
        size = (images.shape[-2], images.shape[-1])
        step = explain(self.module, activations, outputs, self.target, size, labels, self.choice, self.weighting)
        records = []
        for item, t, p, row in zip(items, step.explained.tolist(), step.predicted.tolist(), step.class_scores):
            kind = "true" if self.choice == "true" and item.label is not None else "predicted"
            records.append(
                {
                    "source": item.source,
                    **item.extra,
                    "target": {"kind": kind, "class": t, "name": self.class_names[t]},
                    "predicted": {"class": p, "name": self.class_names[p], "score": round(float(row[p]), 4)},
                    "true": None if item.label is None else {"class": item.label, "name": self.class_names[item.label]},
                }
            )
        return step.maps.cpu(), records


def caption(record: dict[str, Any], score_name: str) -> str:
    """A user image: its file name and the prediction; a dataset image: true and predicted class."""
    first = f"true: {record['true']['name']}" if record["true"] is not None else Path(record["source"]).name
    return f"{first}\npred: {record['predicted']['name']} ({score_name} {record['predicted']['score']:.2f})"


# --- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cubcam explain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="a Lightning checkpoint of a cubcam Classifier or EmbeddingNet")
    parser.add_argument("images", nargs="*", type=Path, help="image files to explain (default: a dataset panel)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default=None,
        help="panel split (default: val, the split held out of the training data, or test when the checkpoint's "
        "data had none)",
    )
    parser.add_argument("--num", type=int, default=16, help="panel size, spread over the split")
    parser.add_argument("--method", choices=("auto", "gradcam", "embeddingcam"), default="auto")
    parser.add_argument(
        "--weighting",
        choices=get_args(Weighting),
        default="gradcam",
        help="how the gradients weight the map (the CAM family; works for embedding nets too)",
    )
    parser.add_argument(
        "--proxy",
        choices=("normalized_mean", "single_point"),
        default="normalized_mean",
        help="EmbeddingCAM proxy of a class: mean of its reference embeddings, or one of them",
    )
    parser.add_argument(
        "--target",
        choices=("true", "predicted"),
        default="true",
        help="class to explain; your own images have no label and always use the predicted class",
    )
    parser.add_argument("--query", type=Path, help="retrieval explanation of this image (embedding nets)")
    parser.add_argument("--topk", type=int, default=5, help="neighbours shown with --query")
    parser.add_argument(
        "--reference-split",
        choices=SPLITS,
        default=None,
        help="split whose embeddings give the proxies and the retrieval gallery "
        "(default: train; in the zero_shot scheme the explained split, val or test)",
    )
    parser.add_argument(
        "--data.root", dest="data_root", default=None, help="dataset root (default: the one saved in the checkpoint)"
    )
    parser.add_argument("--data.split_scheme", dest="split_scheme", choices=("official", "zero_shot"), default=None)
    parser.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's data.image_size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="draws the single-point proxy of each class")
    parser.add_argument("--no-cache", action="store_true", help="recompute the reference embeddings")
    parser.add_argument("--colormap", default="jet")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--wandb", action="store_true", help="also log the overlays and the grid to a W&B run")
    return parser.parse_args(argv)


def fail(message: str) -> NoReturn:
    print(f"error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(2)


def resolve_method(module: CAMModule, requested: str) -> Method:
    wanted = module.cam_method
    if requested not in ("auto", wanted):
        raise CheckpointError(
            f"--method {requested} does not fit this checkpoint ({type(module).__name__}); use {wanted}"
        )
    return wanted


def load_reference(ckpt: LoadedCheckpoint, args: argparse.Namespace, root: str) -> ReferenceSet:
    settings = ckpt.split_settings(args.split_scheme)
    explained = "test" if args.images or args.query else args.split
    return reference_set(
        ckpt.module,
        ckpt.path,
        root,
        split=reference_split(settings["split_scheme"], args.reference_split, explained),
        settings=settings,
        image_size=args.image_size or ckpt.image_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        cache=not args.no_cache,
    )


def image_error(path: Path, err: Exception) -> str:
    """One line naming the file and what is wrong with it; printed, and kept for summary.json."""
    message = one_line(err) if str(path) in str(err) else f"{path}: {one_line(err)}"
    print(f"error: {message}", file=sys.stderr)
    return message


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        ckpt = load_checkpoint(args.checkpoint, map_location=args.device)
        args.split = args.split or ckpt.default_split()
        method = resolve_method(ckpt.module, args.method)
        if args.query is not None and method != "embeddingcam":
            raise CheckpointError("--query explains a retrieval, which needs an embedding net checkpoint")
        root = args.data_root or ckpt.data_hparams.get("root")
        if (method == "embeddingcam" or not args.images) and (root is None or not Path(root).exists()):
            needs = (
                "an embedding net's class proxies (its reference split)"
                if method == "embeddingcam"
                else "a dataset panel"
            )
            raise CheckpointError(
                f"{needs} needs the dataset, but {root or 'no data root saved in the checkpoint'} "
                f"does not exist; pass --data.root"
            )
        reference = load_reference(ckpt, args, root) if method == "embeddingcam" else None
        panel = (
            None
            if args.images or args.query
            else CUBDataset(
                root,
                split=args.split,
                transform=EvalPreset(args.image_size or ckpt.image_size),
                **ckpt.split_settings(args.split_scheme),
            )
        )
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    preset = EvalPreset(args.image_size or ckpt.image_size)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.query is not None:
        failed = explain_retrieval(ckpt, reference, args, preset)
    else:
        failed = explain_images(ckpt, method, reference, args, preset, panel)
    if failed:
        raise SystemExit(1)


def explain_images(
    ckpt: LoadedCheckpoint,
    method: str,
    reference: ReferenceSet | None,
    args: argparse.Namespace,
    preset: EvalPreset,
    panel: CUBDataset | None,
) -> int:
    """Overlays, grid and summary for user images or a dataset panel; returns the number of images that failed."""
    items: list[Item] = []
    errors: list[dict[str, str]] = []
    if panel is None:
        for path in args.images:
            try:
                items.append(Item(source=str(path), image=load_user_image(path, preset)))
            except (OSError, ValueError) as err:
                errors.append({"source": str(path), "error": image_error(path, err)})
        class_names = reference.dataset.class_names if reference is not None else ckpt.module.class_names
    else:
        items = [dataset_item(panel, i, args.split) for i in spread_indices(len(panel), args.num)]
        class_names = panel.class_names

    explainer = make_explainer(ckpt, method, reference, args, class_names)
    records: list[dict[str, Any]] = []
    tiles, maps_all, captions = [], [], []
    for start in range(0, len(items), args.batch_size):
        chunk = items[start : start + args.batch_size]
        maps, chunk_records = explainer(chunk)
        for n, (item, cam, record) in enumerate(zip(chunk, maps, chunk_records), start=start):
            tile = overlay(denormalize(item.image), cam, colormap=args.colormap, alpha=args.alpha)
            name = f"{n:02d}_{Path(record.get('path') or item.source).stem}.png"
            save_png(tile, args.out / name)
            record["overlay"] = name
            records.append(record)
            tiles.append(denormalize(item.image))
            maps_all.append(cam)
            captions.append(caption(record, explainer.target.score_name))
    boxes = [item.box if item.box is not None and bool((item.box[2:] > 0).all()) else None for item in items]
    if items:  # GT box green (dataset images), the CAM's box red, as in the training callback's panels
        save_png(
            grid(tiles, captions, ncols=4, cams=maps_all, boxes=boxes, colormap=args.colormap, alpha=args.alpha),
            args.out / "grid.png",
        )
    summary = {
        "checkpoint": str(ckpt.path),
        "method": method,
        "weighting": args.weighting,
        "proxy": args.proxy if method == "embeddingcam" else None,
        "target": args.target,
        "image_size": [preset.size, preset.size],
        "images": records,
        "errors": errors,
        "grid": "grid.png" if items else None,
    }
    write_json(args.out / "summary.json", summary)
    print(f"explained {len(records)} image(s) into {args.out}" + (f"; {len(errors)} failed" if errors else ""))
    if args.wandb:
        log_to_wandb(args, summary, [args.out / r["overlay"] for r in records], captions)
    return len(errors)


def make_explainer(
    ckpt: LoadedCheckpoint,
    method: Method,
    reference: ReferenceSet | None,
    args: argparse.Namespace,
    class_names: list[str],
) -> Explainer:
    device = torch.device(args.device)
    if reference is None:
        return Explainer(ckpt.module, ClassLogits(), args.target, list(class_names), device, args.weighting)
    target = reference.targets(args.seed)[args.proxy]
    return Explainer(ckpt.module, target, args.target, list(reference.dataset.class_names), device, args.weighting)


def explain_retrieval(
    ckpt: LoadedCheckpoint, reference: ReferenceSet, args: argparse.Namespace, preset: EvalPreset
) -> int:
    """The query's ``topk`` nearest reference images, each pair explained both ways with a Single Point Proxy: the
    query's map scores <query, neighbour>, the neighbour's map scores <neighbour, query>. Writes ``retrieval.png``."""
    module, device = ckpt.module, torch.device(args.device)
    try:
        query = load_user_image(args.query, preset)
    except (OSError, ValueError) as err:
        message = image_error(args.query, err)
        write_json(
            args.out / "summary.json",
            {
                "checkpoint": str(ckpt.path),
                "query": str(args.query),
                "neighbours": [],
                "errors": [{"source": str(args.query), "error": message}],
            },
        )
        return 1
    k = min(args.topk, len(reference.embeddings))
    query_features, query_embedding = features_and_outputs(module, query[None].to(device))
    similarity, indices = reference.nearest(query_embedding.cpu(), k)
    neighbours = torch.stack([reference.dataset[int(i)]["image"] for i in indices[0]]).to(device)
    neighbour_features, _ = features_and_outputs(module, neighbours)
    size = tuple(query.shape[-2:])
    rows = torch.arange(k, device=device)
    query_maps = head_cams(
        module,
        query_features.expand(k, -1, -1, -1).contiguous(),
        size,
        Proxies(single_point_proxy(reference.embeddings[indices[0]]).to(device)),
        rows,
        args.weighting,
    )
    neighbour_maps = head_cams(
        module,
        neighbour_features,
        size,
        Proxies(single_point_proxy(query_embedding[0]).expand(k, -1).to(device)),
        rows,
        args.weighting,
    )
    query_rgb = denormalize(query)
    tiles, maps, captions, records = [], [], [], []
    for rank, (i, sim) in enumerate(zip(indices[0].tolist(), similarity[0].tolist()), start=1):
        label = int(reference.labels[i])
        name = reference.dataset.class_names[label]
        tiles += [query_rgb, denormalize(neighbours[rank - 1].cpu())]
        maps += [query_maps[rank - 1].cpu(), neighbour_maps[rank - 1].cpu()]
        captions += [f"query vs #{rank}", f"#{rank}: {name}\ncos {sim:.3f}"]
        records.append(
            {
                "rank": rank,
                "index": i,
                "image_id": int(reference.dataset[i]["image_id"]),
                "path": str(reference.dataset.image_path(i)),
                "label": label,
                "name": name,
                "similarity": round(sim, 6),
            }
        )
    save_png(
        grid(tiles, captions, ncols=2, cams=maps, colormap=args.colormap, alpha=args.alpha), args.out / "retrieval.png"
    )
    summary = {
        "checkpoint": str(ckpt.path),
        "query": str(args.query),
        "reference_split": reference.split,
        "topk": k,
        "neighbours": records,
        "grid": "retrieval.png",
        "errors": [],
    }
    write_json(args.out / "summary.json", summary)
    print(f"query {args.query}: {k} nearest neighbours in the {reference.split} split -> {args.out / 'retrieval.png'}")
    for r in records:
        print(f"  #{r['rank']}  cos {r['similarity']:.3f}  {r['name']}  ({Path(r['path']).name})")
    if args.wandb:
        log_to_wandb(args, summary, [], [])
    return 0


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def log_to_wandb(args: argparse.Namespace, summary: dict[str, Any], images: list[Path], captions: list[str]) -> None:
    """One W&B run (``job_type=explain``) with the grid and every overlay; WANDB_MODE=offline keeps it local."""
    import wandb  # only here: explaining without --wandb never starts it

    run = wandb.init(
        project="cubcam",
        job_type="explain",
        dir=str(args.out),
        config={k: v for k, v in summary.items() if not isinstance(v, (list, dict))},
    )
    try:
        logged = {"explain/overlays": [wandb.Image(str(p), caption=c) for p, c in zip(images, captions)]}
        if summary.get("grid"):
            logged["explain/grid"] = wandb.Image(str(args.out / summary["grid"]))
        run.log(logged)
        run_dir = Path(run.dir).parent
        print(f"W&B run: {run_dir}" + (f"   upload with: wandb sync {run_dir}" if run.offline else ""))
    finally:
        run.finish()
