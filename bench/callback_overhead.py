"""Epoch time with and without ``cubcam.callbacks.CAMPanel``, in one run.

Scenarios (each: the same module, data and Trainer settings on both sides; W&B offline on both sides):

- ``demo-classifier`` / ``demo-embedding``: the demo configs (``configs/demo/*.yaml``: ResNet-18, output stride 16,
  128 px) on the demo's synthetic set (8 classes x 24 images, what ``demo.sh`` writes: 96 train / 96 val images);
- ``cub-val-embedding``: the embedding net on a CUB-sized validation set (200 classes x 29 = 5,800 images, CUB's test
  split has 5,794) at ``--cub-size`` px, with 2 training batches per epoch: validation dominates the epoch, and the
  callback keeps 512 subset feature maps, gathers 5,800 embeddings and builds 200 proxies.

An epoch is timed from ``on_train_epoch_start`` to ``on_train_epoch_end`` (training plus validation, which Lightning
runs inside the epoch); the first epoch of each run is warm-up (the panel is chosen there). Runs alternate without,
with, with, without (ABBA), so drifting machine load hits both alike; medians are reported, and the time spent
inside the callback's hooks is reported too: on a shared machine it is the steadier figure.

    python bench/callback_overhead.py [--epochs 3] [--scenarios demo-classifier demo-embedding cub-val-embedding]

Target: <= 3% overhead.
"""

from __future__ import annotations

import cubcam.train  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.loggers import WandbLogger

from cubcam.callbacks import CAMPanel
from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.data.synthetic import make_synthetic_cub
from cubcam.train.modules import Classifier, EmbeddingNet

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import EpochTimer

REPO = Path(__file__).resolve().parents[1]
MODULES = {"cubcam.train.modules.Classifier": Classifier, "cubcam.train.modules.EmbeddingNet": EmbeddingNet}


class TimedCAMPanel(CAMPanel):
    """CAMPanel that adds up the wall time spent in its validation hooks per epoch, in all and in its two costly
    parts: the localization metrics (proportional to the metric subset) and the panel (rendered, logged to W&B and
    written as a PNG grid: a fixed cost per epoch)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.seconds: list[float] = []
        self.metric_seconds: list[float] = []
        self.panel_seconds: list[float] = []
        self.metric_images = 0

    def on_validation_epoch_start(self, *args: Any) -> None:
        for times in (self.seconds, self.metric_seconds, self.panel_seconds):
            times.append(0.0)
        self._timed(self.seconds, super().on_validation_epoch_start, *args)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._timed(self.seconds, super().on_validation_batch_end, *args, **kwargs)

    def on_validation_epoch_end(self, *args: Any) -> None:
        self.metric_images = sum(len(part["index"]) for part in self._stored)
        self._timed(self.seconds, super().on_validation_epoch_end, *args)

    def _log_metrics(self, *args: Any) -> None:
        self._timed(self.metric_seconds, super()._log_metrics, *args)

    def _render_and_log(self, *args: Any) -> None:
        self._timed(self.panel_seconds, super()._render_and_log, *args)

    @staticmethod
    def _timed(times: list[float], hook: Any, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        hook(*args, **kwargs)
        times[-1] += time.perf_counter() - start


def demo_config(kind: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "configs" / "demo" / f"{kind}.yaml").read_text())


def run(
    config: dict[str, Any],
    root: Path,
    work: Path,
    epochs: int,
    with_panel: bool,
    data_overrides: dict[str, Any],
    trainer_overrides: dict[str, Any],
) -> tuple[list[float], TimedCAMPanel | None]:
    """Epoch seconds (warm-up dropped) of one fit, and its timed callback (None without)."""
    pl.seed_everything(0, verbose=False)
    data = CUBDataModule(**{**config["data"], "root": str(root), **data_overrides})
    module = MODULES[config["model"]["class_path"]](
        **config["model"]["init_args"], num_classes=data.num_classes, class_names=data.class_names
    )
    timer = EpochTimer()
    panel = TimedCAMPanel() if with_panel else None
    logger = WandbLogger(project="cubcam-bench", save_dir=str(work), offline=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[panel, timer] if panel else [timer],
        **trainer_overrides,
    )
    trainer.fit(module, datamodule=data)
    logger.experiment.finish()
    return timer.seconds[1:], panel


def scenario(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if name.startswith("demo-"):
        kind = name.split("-", 1)[1]
        root = work / "demo_cub"
        if not (root / "CUB_200_2011").exists():
            make_synthetic_cub(root, classes=8, per_class=24, size=128, seed=0)
        config, data_overrides, trainer_overrides = demo_config(kind), {}, {}
    else:
        root = work / f"cub_sized_{args.cub_size}"
        if not (root / "CUB_200_2011").exists():
            start = time.perf_counter()
            make_synthetic_cub(root, classes=200, per_class=58, size=args.cub_size, seed=0)
            print(f"  (wrote the CUB-sized synthetic set in {time.perf_counter() - start:.0f} s)", flush=True)
        config = demo_config("embedding")
        data_overrides = {"image_size": args.cub_size, "batch_size": 64}
        trainer_overrides = {"limit_train_batches": 2}
    results: dict[str, list[float]] = {"without": [], "with": []}
    inside: dict[str, list[float]] = {"all": [], "metrics": [], "panel": []}
    metric_images = 0
    for side in ("without", "with", "with", "without"):
        seconds, panel = run(
            config, root, work / "runs", args.epochs, side == "with", data_overrides, trainer_overrides
        )
        results[side] += seconds
        if panel is not None:  # warm-up epochs dropped, as for the epoch times
            inside["all"] += panel.seconds[1:]
            inside["metrics"] += panel.metric_seconds[1:]
            inside["panel"] += panel.panel_seconds[1:]
            metric_images = panel.metric_images
    data = CUBDataModule(**{**config["data"], "root": str(root), **data_overrides})
    data.setup("fit")
    return {
        "name": name,
        "train": len(data.train_dataset),
        "val": len(data.val_dataset),
        "size": data.hparams.image_size,
        "results": results,
        "inside": inside,
        "metric_images": metric_images,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["demo-classifier", "demo-embedding", "cub-val-embedding"],
        choices=["demo-classifier", "demo-embedding", "cub-val-embedding"],
    )
    parser.add_argument("--cub-size", type=int, default=64, help="image size of the CUB-sized validation set")
    parser.add_argument("--work", type=Path, default=None, help="keep datasets and runs here (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    print(
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; epochs per run {args.epochs} "
        f"(first = warm-up), ABBA order",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for name in args.scenarios:
            r = scenario(name, args, work)
            without, with_ = statistics.median(r["results"]["without"]), statistics.median(r["results"]["with"])
            rest = [a - m - p for a, m, p in zip(*(r["inside"][part] for part in ("all", "metrics", "panel")))]
            inside, metrics, panel = (statistics.median(r["inside"][part]) for part in ("all", "metrics", "panel"))
            print(
                f"{r['name']}: {r['train']} train / {r['val']} val images at {r['size']} px\n"
                f"  epoch without {without:7.2f} s  ({', '.join(f'{s:.2f}' for s in r['results']['without'])})\n"
                f"  epoch with    {with_:7.2f} s  ({', '.join(f'{s:.2f}' for s in r['results']['with'])})\n"
                f"  overhead {100 * (with_ / without - 1):+.1f}% of the epoch; time inside the callback "
                f"{inside:.3f} s = {100 * inside / without:.1f}%  (target <= 3%)\n"
                f"  inside: metrics {metrics:.3f} s over {r['metric_images']} images "
                f"({1000 * metrics / max(r['metric_images'], 1):.2f} ms each), panel {panel:.3f} s, "
                f"the rest {statistics.median(rest):.3f} s; within 3% from epochs of {inside / 0.03:.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
