"""``cubcam compare``: did this checkpoint get better than that one, and where?

    cubcam compare CKPT_A CKPT_B [--split test] [--out DIR]   # any two: two epochs, a classifier and an embedding net
    cubcam compare runs/cubcam/<run id>                       # a run folder: its best checkpoint against its last

The same images (checkpoint A's split, through A's evaluation preset: the maps are compared at those images' size)
go through both checkpoints: each explained as ``cubcam evaluate`` explains it (GradCAM of the ``--target`` class,
the true one by default, or EmbeddingCAM against its own Normalized Mean Proxies) and scored against the GT boxes
by the same accumulator. Writes ``metrics.json`` (both checkpoints' scores and accuracy, B minus A, per class the
change in MaxBoxAccV2 and accuracy, per image the Spearman rank correlation of its two maps) and ``report.html``:
the table side by side, the classes, and every image as a pair of maps, the most changed first. Checkpoints with
different class sets are one error.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cubcam.cams.files import WriteFailed, write_text
from cubcam.cams.localization import LocalizationAccumulator
from cubcam.cams.protocol import HeadExplainer, explain
from cubcam.train.data.cub import SPLITS, spread_indices
from cubcam.train.inspection.checkpoint import CheckpointError, one_line
from cubcam.train.inspection.evaluate import rounded
from cubcam.train.inspection.gallery import GalleryMaps, Tiles, cam_threshold, tile_name, write_tiles
from cubcam.train.inspection.names import METRIC_NAMES, PER_CLASS_KEYS
from cubcam.train.inspection.pages import command_line, compare_page
from cubcam.train.inspection.reference import loader
from cubcam.train.inspection.report import Page, files_folder, render, tables_and_plots, write_page
from cubcam.train.inspection.sanity import rank_correlation
from cubcam.train.inspection.session import START_ERRORS, Session, add_common_options, fail, positive_int, start

COMPARED = (*PER_CLASS_KEYS, "accuracy")  # the scores set side by side
SIDES = ("a", "b")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cubcam compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_options(parser)
    parser.add_argument("other", nargs="?", type=Path, help="checkpoint B (omit it to give a run folder as A)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="split of checkpoint A's data to compare on")
    parser.add_argument("--limit", type=positive_int, default=None, help="compare on this many images, spread")
    parser.add_argument("--out", type=Path, default=None, help="default: <A>-vs-<B>-<split> beside checkpoint A")
    return parser.parse_args(argv)


def checkpoints(args: argparse.Namespace) -> tuple[Path, Path]:
    """(A, B): the two given, or a run folder's best and last checkpoints."""
    first, other = Path(args.checkpoint), args.other
    if first.is_dir():
        if other is not None:
            raise CheckpointError(f"{first} is a folder: give two checkpoint files, or a run folder alone")
        folder = first / "checkpoints" if (first / "checkpoints").is_dir() else first
        best = sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
        last = folder / "last.ckpt"
        if not best or not last.is_file():
            raise CheckpointError(
                f"{first} has no best*.ckpt and last.ckpt to compare (a cubcam run folder's checkpoints/ has them)"
            )
        return best[-1], last
    if other is None:
        raise CheckpointError(f"cubcam compare needs two checkpoints, or a run folder; got {first} alone")
    return first, Path(other)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Compare two checkpoints; returns what it wrote to metrics.json."""
    args = parse_args(argv)
    try:
        paths = checkpoints(args)
        sessions = []
        for path in paths:
            side = copy.copy(args)
            side.checkpoint = path
            sessions.append(start(side))
        first = sessions[0]
        split = args.split
        names = same_classes(sessions)
        dataset = first.dataset(split)
        # each checkpoint's own target: logits, or its own proxies from its own reference split
        targets = [s.target("normalized_mean", s.reference(split), split) for s in sessions]
    except START_ERRORS as err:
        fail(err)
    indices = spread_indices(len(dataset), args.limit) if args.limit else list(range(len(dataset)))
    scored = torch.utils.data.Subset(dataset, indices)
    count = len(indices)
    accumulators = [LocalizationAccumulator(count, device=first.device) for _ in SIDES]
    galleries = [GalleryMaps(count) for _ in SIDES]
    correct = np.zeros((2, count), bool)
    correlation = np.zeros(count)
    labels = np.zeros(count, np.int64)
    seen = 0
    with tqdm(total=count, desc="compare", unit="img", file=sys.stderr, dynamic_ncols=True) as bar:
        for batch in loader(scored, args.batch_size, args.num_workers):
            images = batch["image"].to(first.device)
            size = (int(images.shape[-2]), int(images.shape[-1]))
            slots = list(range(seen, seen + len(images)))
            labels[slots] = batch["label"].numpy()
            maps = []
            for k, (session, target) in enumerate(zip(sessions, targets)):
                head = HeadExplainer(session.ckpt.module)
                activations, outputs = head.features_and_outputs(images.to(session.device))
                step = explain(head, activations, outputs, target, size, batch["label"], args.target)
                maps.append(step.maps.float().to(first.device))
                accumulators[k].update(slots, maps[-1], batch["box"], batch["parts"])
                galleries[k].add(slots, maps[-1])
                correct[k, slots] = (step.predicted.cpu() == batch["label"]).numpy()
            correlation[slots] = rank_correlation(maps[0], maps[1]).cpu().numpy()
            seen += len(images)
            bar.update(len(images))
    result = summary(sessions, split, names, accumulators, correct, correlation, labels)
    result["images"] = [
        {"index": index, "file": dataset.image_path(index).name, "class": names[int(labels[slot])],
         "rank_correlation": float(correlation[slot])}
        for slot, index in enumerate(indices)
    ]  # fmt: skip
    result = rounded(result)
    out = args.out or paths[0].with_name(f"{paths[0].stem}-vs-{paths[1].stem}-{split}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "metrics.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
        layers = [(gallery.maps, result[side]["cam_threshold"]) for side, gallery in zip(SIDES, galleries)]
        tiles = Tiles(scored, layers, (dataset.mean, dataset.std))
        items = pair_items(result, tiles, out, args.num_workers)
        page = compare_page(result, items, command_line(argv, "cubcam compare"))
        write_page(out / "report.html", page)
    except (WriteFailed, PermissionError) as err:
        fail(err)
    print_table(result)
    print(f"wrote {out / 'metrics.json'}; open {out / 'report.html'} in a browser")
    if args.wandb:
        log_to_wandb(args.wandb, result, page, out)
    return result


def same_classes(sessions: list[Session]) -> list[str]:
    """The class names both checkpoints were trained on; CheckpointError where they differ."""
    names = [list(s.ckpt.module.class_names) for s in sessions]
    if names[0] != names[1]:
        only = [n for n in names[0] if n not in names[1]][:3]
        raise CheckpointError(
            f"the checkpoints have different class sets ({len(names[0])} and {len(names[1])} classes"
            + (f"; {', '.join(map(repr, only))} only in A" if only else "")
            + "): compare checkpoints trained on the same classes"
        )
    return names[0]


def summary(
    sessions: list[Session],
    split: str,
    names: list[str],
    accumulators: list[LocalizationAccumulator],
    correct: np.ndarray,
    correlation: np.ndarray,
    labels: np.ndarray,
) -> dict[str, Any]:
    """What metrics.json holds (without the per-image rows): each side's scores, B minus A, per class."""
    sides: dict[str, dict[str, Any]] = {}
    for k, (side, session) in enumerate(zip(SIDES, sessions)):
        computed = accumulators[k].compute()
        scores = {key: float(computed[key]) for key in PER_CLASS_KEYS} | {"accuracy": float(correct[k].mean())}
        sides[side] = {
            "checkpoint": str(session.ckpt.path),
            "kind": session.kind,
            "scores": scores,
            "cam_threshold": cam_threshold(computed),  # where the page's CAM boxes are cut
        }
    classes = {}
    for label in np.unique(labels):
        slots = np.flatnonzero(labels == label)
        row: dict[str, Any] = {"images": len(slots)}
        for k, side in enumerate(SIDES):
            row[f"{side}_max_box_acc"] = float(accumulators[k].compute(slots)["max_box_acc"])
            row[f"{side}_accuracy"] = float(correct[k, slots].mean())
        for key in ("max_box_acc", "accuracy"):
            row[f"change_{key}"] = row[f"b_{key}"] - row[f"a_{key}"]
        row["rank_correlation"] = float(correlation[slots].mean())
        classes[names[int(label)]] = row
    return {
        "split": split,
        "num_images": len(labels),
        "image_size": sessions[0].image_size,
        **sides,
        "difference": {key: sides["b"]["scores"][key] - sides["a"]["scores"][key] for key in COMPARED},
        "rank_correlation": float(correlation.mean()),
        "per_class": classes,
    }


def pair_items(result: dict[str, Any], tiles: Tiles, out: Path, num_workers: int) -> list[dict[str, Any]]:
    """Each image's two ``tiles`` (``report_files/a``, ``/b``: A's and B's, each CAM box at its own best threshold,
    drawn in ``num_workers`` processes) and its caption, the most changed (lowest rank correlation) first."""
    with files_folder(out) as folder:
        for side in SIDES:
            (folder / side).mkdir()
        ious = write_tiles([folder / side for side in SIDES], tiles, num_workers)
    items = []
    for slot, image in enumerate(result["images"]):
        a, b = ious[0][slot], ious[1][slot]
        change = None if a is None or b is None else b - a
        lines = [image["file"], f"true: {image['class']}", f"rank correlation {image['rank_correlation']:.2f}"]
        if a is not None and b is not None:
            lines.append(f"IoU A {a:.2f} -> B {b:.2f}")
        items.append(
            {
                "id": slot,
                "srcs": [f"report_files/{side}/{tile_name(slot)}" for side in SIDES],
                "caption": "\n".join(lines),
                "file": image["file"],
                "true": image["class"],
                "rank_correlation": image["rank_correlation"],
                "iou_change": change,
            }
        )
    return items


def log_to_wandb(project: str, result: dict[str, Any], page: Page, out: Path) -> None:
    """The scores side by side (a table, and B minus A in the run summary) and the page's tables (``compare/report``,
    an HTML panel) as one W&B run of ``project`` (job type ``compare``). A W&B failure is one warning: the files on
    disk are the result."""
    try:
        import wandb

        run = wandb.init(project=project, job_type="compare", dir=str(out),
                         config={"a": result["a"]["checkpoint"], "b": result["b"]["checkpoint"],
                                 "split": result["split"], "num_images": result["num_images"]})  # fmt: skip
        try:
            rows = [[key, result["a"]["scores"][key], result["b"]["scores"][key], change]
                    for key, change in result["difference"].items()]  # fmt: skip
            run.log(
                {
                    "compare/scores": wandb.Table(columns=["metric", "a", "b", "b - a"], data=rows),
                    "compare/report": wandb.Html(render(tables_and_plots(page, out)), inject=False),
                }
            )
            run.summary.update({f"difference/{key}": value for key, value in result["difference"].items()})
        finally:
            run.finish()
        print(f"logged to W&B: project {project}, run {run.id}")
    except Exception as err:  # the comparison is done and written: a dashboard failure must not hide it
        print(f"warning: could not log to W&B ({one_line(err)}); the results are in {out}", file=sys.stderr)


def print_table(result: dict[str, Any]) -> None:
    print(f"A: {result['a']['checkpoint']}\nB: {result['b']['checkpoint']}")
    print(f"{result['num_images']} images of the {result['split']} split, in %:")
    print(f"{'':32}{'A':>8}{'B':>8}{'B - A':>8}")
    for key in COMPARED:
        a, b = result["a"]["scores"][key], result["b"]["scores"][key]
        print(f"{METRIC_NAMES.get(key, key):32}{100 * a:8.1f}{100 * b:8.1f}{100 * (b - a):+8.1f}")
    print(f"mean rank correlation of the two maps of an image: {result['rank_correlation']:.2f}")
