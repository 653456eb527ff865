"""``cubcam explain``: what a trained checkpoint looks at, on your images, on a dataset panel, or in a retrieval.

    cubcam explain CKPT bird.jpg photo.png --out explained/           # your images (any size, any mode)
    cubcam explain CKPT --split val --num 16 --out explained/         # a panel of the dataset (true class, GT box)
    cubcam explain CKPT --query bird.jpg --topk 5 --out retrieval/    # an embedding net's nearest neighbours

Every image goes through the evaluation preset (shorter side to ``size * 256/224``, centre crop ``size``), so the
model sees exactly what it saw in validation; each overlay PNG is that ``size x size`` crop with the heatmap on it.
A classifier is explained with GradCAM, an embedding net with EmbeddingCAM against a class proxy built from the
reference split's embeddings (cached beside the checkpoint after the first run). Writes one overlay per image
(``NN_<name>.png``, zero-padded to sort), ``grid.png`` (captioned tiles; GT box green and CAM box red where a box is
known; ``grid_1.png``, ``grid_2.png``, ... of 64 tiles past 64 images) and ``summary.json``, a batch at a time
(memory does not grow with the number of images). Your photos are turned upright by their EXIF orientation. An image
that cannot be read is reported in one line and skipped; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cubcam.cams import overlay
from cubcam.cams.engine import aug_views
from cubcam.cams.figure import (
    BOX_LEGEND,
    cam_box,
    draw_boxes,
    grid,
    marked,
    pair_strips,
    save_png,
    unbroken,
    with_legend,
)
from cubcam.cams.files import WriteFailed
from cubcam.cams.localization import box_iou, pointing_game
from cubcam.cams.methods import METHODS, Method, methods_needing
from cubcam.cams.overlay import denormalize
from cubcam.cams.protocol import UNKNOWN_LABEL, Choice, Explainer, explain, explainer_for, finer_maps, pair_maps
from cubcam.cams.targets import ExplanationTarget, Proxies, ProxyScheme, finer_of, proxy_scheme
from cubcam.train.data.cub import SPLITS, CUBDataset, spread_indices
from cubcam.train.data.presets import EvalPreset, load_rgb
from cubcam.train.inspection.checkpoint import CheckpointError, one_line
from cubcam.train.inspection.explain_output import GRID_PAGE, GridPages, log_to_wandb, write_json
from cubcam.train.inspection.gallery import THUMB, jpeg, tile_name
from cubcam.train.inspection.pages import CAM_THRESHOLD, command_line, explain_page, retrieval_page
from cubcam.train.inspection.reference import ReferenceSet
from cubcam.train.inspection.report import files_folder, write_page
from cubcam.train.inspection.session import (
    START_ERRORS,
    Session,
    add_common_options,
    add_finer_option,
    fail,
    positive_int,
    start,
)

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
    """A user's image file through the evaluation preset; any size, any mode (grayscale, palette, alpha), turned
    upright by its EXIF orientation."""
    pil = load_rgb(path, exif_orientation=True)
    width, height = pil.size
    image, _, _ = preset(pil, torch.tensor([0.0, 0.0, width, height]), torch.zeros(15, 3))
    return image


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
class ImageExplainer:
    """What a run of ``explain`` needs to turn images into maps and records: one step of
    ``cubcam.cams.protocol.explain`` per batch."""

    explainer: Explainer
    target: ExplanationTarget  # class logits, or the reference split's proxies
    choice: Choice  # "true" (where an image has a label) or "predicted"
    class_names: list[str]
    device: torch.device
    method: Method = "gradcam"
    finer: int = 0  # rivals of Finer-CAM's second map (0: none)
    aug_smooth: bool = False
    eigen_smooth: bool = False

    def __call__(self, items: list[Item]) -> tuple[Tensor, Tensor | None, list[dict[str, Any]]]:
        """(maps [B, H, W], Finer-CAM maps [B, H, W] or None, a record per image)."""
        images = torch.stack([item.image for item in items]).to(self.device)
        features, outputs = self.explainer.features_and_outputs(images)
        labels = torch.tensor([UNKNOWN_LABEL if item.label is None else item.label for item in items])
        index = torch.tensor([int(item.extra.get("index", -1)) for item in items])  # -1: not a dataset image
        size = (images.shape[-2], images.shape[-1])
        step = explain(
            self.explainer, features, outputs, self.target, size, labels, self.choice, self.method, index,
            self.eigen_smooth,
        )  # fmt: skip
        maps = self.smoothed(images, step.maps, step.rows) if self.aug_smooth else step.maps
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
        if not self.finer:
            return maps.cpu(), None, records
        finer, rows = finer_maps(
            self.explainer, features, outputs, self.target.target, size, step.explained, self.finer, self.method
        )
        for record, row in zip(records, rows.tolist()):
            record["finer"] = {"rivals": [{"class": k, "name": self.class_names[k]} for k in row[1:]]}
        return maps.cpu(), finer.cpu(), records

    def smoothed(self, images: Tensor, maps: Tensor, rows: Tensor) -> Tensor:
        """pytorch-grad-cam's ``aug_smooth`` (``cubcam.cams.engine.CAM._smoothed``): the mean of the maps of six
        views, ``images`` and their mirror images times 0.9, 1 and 1.1, each turned back; every view explains the
        rows of the plain one (``maps``), so the class its record names holds for every view."""
        size = (images.shape[-2], images.shape[-1])
        views = [maps]
        for view, back in itertools.islice(aug_views(images), 1, None):  # the plain view's maps are ``maps``
            features, _ = self.explainer.features_and_outputs(view)
            views.append(
                back(self.explainer.maps(features, size, self.target.target, rows, self.method, self.eigen_smooth))
            )
        return torch.stack(views).mean(0)


def caption(record: dict[str, Any], score_name: str, cam: Tensor) -> str:
    """A tile's caption: the image's file name; a dataset image's true class; the prediction (its score before the
    name: a name too long for the tile is cut, never the score); the class the map explains (and "empty map" where
    nothing passed the ReLU). Class names wrap as a whole where a line holds them."""
    lines = [Path(record.get("path") or record["source"]).name]
    if record["true"] is not None:
        lines.append(f"true: {unbroken(record['true']['name'])}")
    predicted = record["predicted"]
    lines.append(f"pred ({score_name} {predicted['score']:.2f}): {unbroken(predicted['name'])}")
    lines.append("map: " + marked(f"{unbroken(record['target']['name'])} ({record['target']['kind']})", cam))
    return "\n".join(lines)


def retrieval_caption(query: str | Path, rank: int, similarity: float, name: str, path: str | Path) -> str:
    """A retrieval strip's caption: the query's file, then the neighbour's rank, cosine, class and file."""
    return f"query: {Path(query).name}\n#{rank} (cos {similarity:.3f}): {unbroken(name)}\n{Path(path).name}"


def finer_caption(record: dict[str, Any], cam: Tensor) -> str:
    """What a Finer-CAM tile shows: the explained class against its rivals (the nearest named, the others counted:
    every one of them is in summary.json)."""
    first, *others = (rival["name"] for rival in record["finer"]["rivals"])
    more = f"\nand {len(others)} more" if others else ""
    return f"Finer-CAM: what tells\n{unbroken(record['target']['name'])}\n" + marked(
        f"apart from {unbroken(first)}{more}", cam
    )


# --- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cubcam explain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_options(parser)
    parser.add_argument("images", nargs="*", type=Path, help="image files to explain (default: a dataset panel)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default=None,
        help="panel split (default: val, the split held out of the training data, or test when the checkpoint's "
        "data had none)",
    )
    parser.add_argument("--num", type=positive_int, default=16, help="panel size, spread over the split")
    parser.add_argument(
        "--method",
        choices=list(METHODS),
        default="gradcam",
        help="the CAM method (from gradients: "
        + ", ".join(methods_needing("gradients"))
        + "; without: "
        + ", ".join(methods_needing("image forwards", "layer forwards", "nothing"))
        + "); each works for embedding nets too",
    )
    parser.add_argument(
        "--proxy",
        choices=get_args(ProxyScheme),
        default="normalized_mean",
        help="EmbeddingCAM proxy (from the reference split's embeddings): the class's Normalized Mean Proxy, one of "
        "its images drawn with --seed (single_point_random), or each image's nearest "
        "reference image (single_point_nearest)",
    )
    add_finer_option(
        parser,
        "a second map per image, Finer-CAM: what tells its class apart from its rivals; with --query, what tells the "
        "query's nearest neighbour apart from the nearest one of another class",
    )
    parser.add_argument(
        "--aug-smooth",
        action="store_true",
        help="pytorch-grad-cam's aug_smooth: each map the mean of six views (the image and its mirror image, times "
        "0.9, 1 and 1.1), six forwards and backwards an image",
    )
    parser.add_argument(
        "--eigen-smooth",
        action="store_true",
        help="pytorch-grad-cam's eigen_smooth: each map from the first principal component of the weighted "
        "activations (gradient methods)",
    )
    parser.add_argument("--query", type=Path, help="retrieval explanation of this image (embedding nets)")
    parser.add_argument("--topk", type=positive_int, default=5, help="neighbours shown with --query")
    parser.add_argument("--colormap", default="jet")
    parser.add_argument("--alpha", type=float, default=0.5)
    return parser.parse_args(argv)


def image_error(path: Path, err: Exception) -> str:
    """One line naming the file and what is wrong with it; printed, and kept for summary.json."""
    message = one_line(err) if str(path) in str(err) else f"{path}: {one_line(err)}"
    print(f"error: {message}", file=sys.stderr)
    return message


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.command = command_line(argv, "cubcam explain")  # for the page
    try:
        session = start(args)
        args.split = args.split or session.ckpt.default_split()
        if args.query is not None and session.kind != "embedding":
            raise CheckpointError("--query explains a retrieval, which needs an embedding net checkpoint")
        if args.eigen_smooth and METHODS[args.method].needs != "gradients":
            raise ValueError(f"--eigen-smooth smooths a gradient method's weighted activations; {args.method} has none")
        if args.query is not None and (args.aug_smooth or args.eigen_smooth):
            raise ValueError("--aug-smooth and --eigen-smooth smooth the maps of explained images, not a --query")
        explained = "test" if args.images or args.query else args.split
        panel = None if args.images or args.query else session.dataset(args.split)
        reference = session.reference(explained)
        scheme = proxy_scheme(args.proxy)
    except START_ERRORS as err:
        fail(err)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        if reference is not None and args.query is not None:
            failed = explain_retrieval(session, reference, args)
        else:
            failed = explain_images(session, session.target(scheme, reference, explained), reference, args, panel)
    except (WriteFailed, PermissionError) as err:  # a full disk, a read-only folder: one line, not a traceback
        fail(err)
    if failed:
        raise SystemExit(1)


def explain_images(
    session: Session,
    target: ExplanationTarget,
    reference: ReferenceSet | None,
    args: argparse.Namespace,
    panel: CUBDataset | None,
) -> int:
    """Overlays, grid pages and summary for user images or a dataset panel; returns the number of images that
    failed. Streams: images are read a batch at a time and each page of the grid is written when it is full, so
    memory does not grow with the number of images."""
    errors: list[dict[str, str]] = []
    preset = session.preset
    if panel is None:
        sources: list[Any] = list(args.images)
        class_names = reference.dataset.class_names if reference is not None else session.ckpt.module.class_names
    else:
        sources = spread_indices(len(panel), args.num)
        class_names = panel.class_names

    def load(source: Any) -> Item | None:
        if panel is not None:
            return dataset_item(panel, source, args.split)
        try:
            return Item(source=str(source), image=load_user_image(source, preset))
        except (OSError, ValueError) as err:
            errors.append({"source": str(source), "error": image_error(source, err)})
            return None

    explainer = ImageExplainer(
        explainer_for(session.ckpt.module, args.method, args.channel_batch_size),
        target,
        args.target,
        list(class_names),
        session.device,
        args.method,
        args.finer,
        args.aug_smooth,
        args.eigen_smooth,
    )
    digits = max(2, len(str(len(sources) - 1)))  # 000_... sorts past 99 images
    tiles = len(sources) * (2 if args.finer else 1)  # with --finer each image's two maps sit side by side
    legend = f"{BOX_LEGEND} Each tile: the image with the map of the class after 'map:'" + (
        "; after it, its Finer-CAM: what tells that class apart from its nearest rivals." if args.finer else "."
    )
    pages = GridPages(args.out, math.ceil(tiles / GRID_PAGE), args.colormap, args.alpha, legend)
    records: list[dict[str, Any]] = []
    captions: list[str] = []  # small: one line per image, for W&B
    interrupted = False
    with files_folder(args.out) as thumbs:  # the page's thumbnails, swapped in whole at the end
        try:
            for first in range(0, len(sources), args.batch_size):
                chunk = [item for item in map(load, sources[first : first + args.batch_size]) if item is not None]
                if not chunk:
                    continue
                maps, finer, chunk_records = explainer(chunk)
                for i, (item, cam, record) in enumerate(zip(chunk, maps, chunk_records)):
                    pixels = denormalize(item.image)
                    stem = f"{len(records):0{digits}d}_{Path(record.get('path') or item.source).stem}"
                    save_png(overlay(pixels, cam, colormap=args.colormap, alpha=args.alpha), args.out / f"{stem}.png")
                    record["overlay"] = f"{stem}.png"
                    records.append(record)
                    captions.append(caption(record, target.target.score_name, cam))
                    box = item.box if item.box is not None and bool((item.box[2:] > 0).all()) else None
                    pages.add(pixels, captions[-1], cam, box)
                    tile = page_tile(pixels, cam, box, record, args.colormap, args.alpha)
                    (thumbs / tile_name(len(records) - 1)).write_bytes(tile)
                    if finer is not None:
                        finer_overlay = overlay(pixels, finer[i], colormap=args.colormap, alpha=args.alpha)
                        save_png(finer_overlay, args.out / f"{stem}_finer.png")
                        record["finer"]["overlay"] = f"{stem}_finer.png"
                        pages.add(pixels, finer_caption(record, finer[i]), finer[i], box)
        except KeyboardInterrupt:  # Ctrl-C: what is explained so far is written below, then the exit status says so
            interrupted = True
    written = pages.close()
    summary = {
        "checkpoint": str(session.ckpt.path),
        "kind": session.kind,
        "method": args.method,
        "finer_rivals": args.finer,
        "aug_smooth": args.aug_smooth,
        "eigen_smooth": args.eigen_smooth,
        "proxy": target.scheme,
        "target": args.target,
        "image_size": [preset.size, preset.size],
        "images": records,
        "errors": errors,
        "grid": written[0] if written else None,
        "grids": written,
    }
    if interrupted:
        summary["interrupted"] = True
    write_json(args.out / "summary.json", summary)
    page = write_page(args.out / "report.html", explain_page(summary, args.command))
    if interrupted:
        print(
            f"interrupted: explained {len(records)} of {len(sources)} image(s) into {args.out} (summary.json and the "
            f"grid hold them)",
            file=sys.stderr,
        )
        raise SystemExit(130)
    print(
        f"explained {len(records)} image(s) into {args.out}"
        + (f"; {len(errors)} failed" if errors else "")
        + f"; open {page} in a browser"
    )
    if args.wandb:
        log_to_wandb(args, summary, [args.out / r["overlay"] for r in records], captions)
    return len(errors)


def page_tile(
    pixels: np.ndarray, cam: Tensor, box: Tensor | None, record: dict[str, Any], colormap: str, alpha: float
) -> bytes:
    """The page's tile of one image (overlay, GT box green, CAM box red at ``CAM_THRESHOLD``) as a ``THUMB`` px
    JPEG; the record gets the IoU of the two boxes and whether the map's peak lies in the GT box (images with one)."""
    drawn = cam_box(cam, CAM_THRESHOLD)  # once: the tile's red box and the IoU are the same box
    if box is not None:
        record["cam_box_iou"] = round(float(box_iou(drawn, box)) if drawn is not None else 0.0, 4)
        record["peak_in_box"] = bool(pointing_game(cam[None], boxes=box[None].double())[0] > 0.5)
    tile = draw_boxes(overlay(pixels, cam, colormap=colormap, alpha=alpha), box, drawn)
    return jpeg(Image.fromarray(tile).resize((THUMB, THUMB), Image.Resampling.BILINEAR))


def explain_retrieval(session: Session, reference: ReferenceSet, args: argparse.Namespace) -> int:
    """The query's ``topk`` nearest reference images, each pair explained both ways with a Single Point Proxy
    (``cubcam.cams.protocol.pair_maps``, drawn as the callback's nearest-image panel draws them): the query's map
    scores <query, neighbour>, the neighbour's map scores <neighbour, query>. Writes ``retrieval.png``."""
    explainer, device = explainer_for(session.ckpt.module, args.method, args.channel_batch_size), session.device
    try:
        query = load_user_image(args.query, session.preset)
    except (OSError, ValueError) as err:
        message = image_error(args.query, err)
        write_json(
            args.out / "summary.json",
            {
                "checkpoint": str(session.ckpt.path),
                "query": str(args.query),
                "neighbours": [],
                "errors": [{"source": str(args.query), "error": message}],
            },
        )
        return 1
    k = min(args.topk, len(reference.embeddings))
    query_features, query_embedding = explainer.features_and_outputs(query[None].to(device))
    similarity, indices = reference.nearest(query_embedding.cpu(), k)
    neighbours = torch.stack([reference.dataset[int(i)]["image"] for i in indices[0]]).to(device)
    size = (int(query.shape[-2]), int(query.shape[-1]))
    pairs = pair_maps(
        explainer,
        (query_features.expand(k, *query_features.shape[1:]), query_embedding.expand(k, -1)),
        explainer.features_and_outputs(neighbours),
        size,
        args.method,
    )
    labels = [int(reference.labels[i]) for i in indices[0].tolist()]
    strips = pair_strips(
        [denormalize(query)] * k,
        list(denormalize(neighbours.cpu())),
        pairs,
        ([None] * k, [None] * k),
        ([UNKNOWN_LABEL] * k, labels),
        args.colormap,
        args.alpha,
    )
    captions, records = [], []
    for rank, (i, sim, label) in enumerate(zip(indices[0].tolist(), similarity[0].tolist(), labels), start=1):
        name = reference.dataset.class_names[label]
        path = reference.dataset.image_path(i)
        captions.append(retrieval_caption(args.query, rank, sim, name, path))
        records.append(
            {
                "rank": rank,
                "index": i,
                "image_id": int(reference.dataset[i]["image_id"]),
                "path": str(path),
                "label": label,
                "name": name,
                "similarity": round(sim, 6),
            }
        )
    legend = (
        "Each row: the query with its map against the neighbour (its similarity), then the neighbour with its map "
        "against the query. Red box: the map's largest region above the CAM threshold."
    )
    save_png(with_legend(grid([s.boxed for s in strips], captions, ncols=1), legend), args.out / "retrieval.png")
    finer = retrieval_finer(explainer, reference, args, query, query_features, query_embedding) if args.finer else None
    summary = {
        "checkpoint": str(session.ckpt.path),
        "query": str(args.query),
        "reference_split": reference.split,
        "topk": k,
        "neighbours": records,
        "grid": "retrieval.png",
        "errors": [],
    }
    if finer is not None:
        summary["finer"] = finer
    write_json(args.out / "summary.json", summary)
    write_page(args.out / "report.html", retrieval_page(summary, args.command))
    print(f"query {args.query}: {k} nearest neighbours in the {reference.split} split -> {args.out / 'retrieval.png'}")
    for r in records:
        print(f"  #{r['rank']}  cos {r['similarity']:.3f}  {r['name']}  ({Path(r['path']).name})")
    if finer is not None and "overlay" in finer:
        print(f"  {' '.join(finer['caption'].split())} -> {args.out / finer['overlay']}")
    if args.wandb:
        log_to_wandb(args, summary, [], [])
    return 0


def retrieval_finer(
    explainer: Explainer,
    reference: ReferenceSet,
    args: argparse.Namespace,
    query: Tensor,
    features: Tensor,
    embedding: Tensor,
) -> dict[str, Any]:
    """What makes the query like its nearest neighbour rather than the nearest neighbour of another class: Finer-CAM
    of the query's similarity to the first (a Single Point Proxy) with the second as its one rival. Writes
    ``retrieval_finer.png``; returns its record."""
    similarity, indices = reference.nearest(embedding.cpu(), len(reference.embeddings))
    order = indices[0].tolist()
    first = order[0]
    other = next((i for i in order if int(reference.labels[i]) != int(reference.labels[first])), None)
    if other is None:
        return {"error": "the reference split holds one class: no neighbour of another class to tell apart"}
    proxies = Proxies(reference.embeddings[[first, other]].to(embedding.device))
    target = finer_of(proxies)
    rows = torch.tensor([[0, 1]], device=features.device)
    size = (int(query.shape[-2]), int(query.shape[-1]))
    cam = explainer.maps(features, size, target, rows, args.method)[0].cpu()
    names = [reference.dataset.class_names[int(reference.labels[i])] for i in (first, other)]
    rank = order.index(other) + 1
    text = f"Finer-CAM of the query:\nlike #1 {unbroken(names[0])}\nrather than #{rank} {unbroken(names[1])}"
    tile = grid(
        [denormalize(query)],
        [marked(text, cam)],
        ncols=1,
        cams=[cam],
        colormap=args.colormap,
        alpha=args.alpha,
    )
    save_png(tile, args.out / "retrieval_finer.png")
    neighbour = {
        i: {"index": i, "path": str(reference.dataset.image_path(i)), "name": n, "similarity": round(float(s), 6)}
        for i, n, s in ((first, names[0], similarity[0, 0]), (other, names[1], similarity[0, rank - 1]))
    }
    return {
        "like": neighbour[first],
        "rather_than": {**neighbour[other], "rank": rank},
        "caption": text,
        "overlay": "retrieval_finer.png",
    }
