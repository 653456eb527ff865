"""Epoch time with and without ``cubcam.callbacks.CAMPanel``, in one run.

Scenarios (each: the same module, data and Trainer settings on both sides; W&B offline on both sides):

- ``demo-classifier`` / ``demo-embedding``: the demo configs (``configs/demo/*.yaml``: ResNet-18, output stride 16,
  128 px) on the demo's synthetic set (8 classes x 40 images, what ``demo.sh`` writes: 128 train / 32 val images);
- ``cub-val-embedding``: the embedding net on a CUB-sized validation set (200 classes x 29 = 5,800 images, CUB's test
  split has 5,794) at ``--cub-size`` px, with 2 training batches per epoch: validation dominates the epoch, and the
  callback keeps 512 subset feature maps, gathers 5,800 embeddings and builds 200 proxies;
- ``cub-val-layer``: the same, through the path for modules that do not speak cubcam's protocol
  (``CAMPanel(target_layer="net.backbone.layer4", method="embeddingcam")`` on an embedding net whose
  ``validation_step`` just calls ``self(images)``): the panel's and the metric subset's images are kept from the
  loop's batches and run forward and backward every epoch (``--layer-subset`` images; default: the callback's
  default for this path).

An epoch is timed from ``on_train_epoch_start`` to ``on_train_epoch_end`` (training plus validation, which Lightning
runs inside the epoch); the first epoch of each run is warm-up (the panel is chosen there). Runs alternate without,
with, with, without (ABBA), so drifting machine load hits both alike; medians are reported, and the time spent
inside the callback's hooks is reported too: on a shared machine it is the steadier figure.

    python bench/callback_overhead.py [--epochs 3] [--scenarios demo-classifier demo-embedding cub-val-embedding]

Both sides log to W&B and TensorBoard (``--no-tensorboard``: W&B only); each sink's seconds are reported per
epoch (W&B images, W&B table, TensorBoard, the PNG files) and the evolution once at the end of fit.

Target: <= 3% overhead with W&B; TensorBoard adds <= 0.5%.
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
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from cubcam.callbacks import CAMPanel, cam_panel
from cubcam.callbacks.sinks import PanelSink, WandbSink
from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.data.synthetic import make_synthetic_cub
from cubcam.train.modules import Classifier, EmbeddingNet

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import EpochTimer

REPO = Path(__file__).resolve().parents[1]
MODULES = {"cubcam.train.modules.Classifier": Classifier, "cubcam.train.modules.EmbeddingNet": EmbeddingNet}


class PlainEmbeddingNet(EmbeddingNet):
    """The embedding net as a module that knows nothing of cubcam: validation calls ``self(images)`` and returns
    nothing (the retrieval metrics are kept, so both sides do the same validation work)."""

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._collected.append((batch["index"], self(batch["image"]), batch["label"]))


class TimedSink:
    """A sink wrapped to add up its own seconds per epoch (``panel``) and at the end of fit (``evolution``)."""

    def __init__(self, sink: PanelSink, clock: dict[str, list[float]]):
        self.sink, self.name, self.clock = sink, sink.name, clock

    def log_panel(self, panel: Any, step: int) -> None:
        if isinstance(self.sink, WandbSink):  # timed in two parts: the image list, then the table of the same panel
            self._time("W&B images", self.sink.log_panel, panel, step, table=False)
            self._time("W&B table", self.sink.log_table, panel, step)
        else:
            self._time(type(self.sink).__name__.removesuffix("Sink"), self.sink.log_panel, panel, step)

    def log_evolution(self, evolution: Any, step: int) -> None:
        self._time("evolution (all sinks, once)", self.sink.log_evolution, evolution, step)

    def _time(self, key: str, call: Any, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        call(*args, **kwargs)
        self.clock.setdefault(key, [0.0])[-1] += time.perf_counter() - start


class TimedCAMPanel(CAMPanel):
    """CAMPanel that adds up the wall time spent in its hooks per epoch, in all and in its costly parts: the
    localization metrics (proportional to the metric subset), the panel (rendered and handed to the sinks: a fixed
    cost per epoch), each sink, and the evolution at the end of fit."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.clock: dict[str, list[float]] = {"all": [], "metrics": [], "panel": []}
        self.metric_images = 0

    def on_validation_epoch_start(self, *args: Any) -> None:
        for times in self.clock.values():
            times.append(0.0)
        self._timed("all", super().on_validation_epoch_start, *args)

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self._timed("all", super().on_validation_batch_start, *args, **kwargs)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._timed("all", super().on_validation_batch_end, *args, **kwargs)

    def on_validation_epoch_end(self, *args: Any) -> None:
        if self._epoch is not None:
            self.metric_images = len(self._epoch.subset_columns().get("index", []))
        self._timed("all", super().on_validation_epoch_end, *args)

    def on_fit_end(self, *args: Any) -> None:
        self.clock.setdefault("evolution (all sinks, once)", []).append(0.0)
        super().on_fit_end(*args)

    def _render_and_log(self, *args: Any) -> None:
        self._timed("panel", super()._render_and_log, *args)

    def _sinks_of(self, trainer: pl.Trainer) -> list[Any]:
        return [TimedSink(sink, self.clock) for sink in super()._sinks_of(trainer)]

    def _timed(self, key: str, hook: Any, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        hook(*args, **kwargs)
        self.clock[key][-1] += time.perf_counter() - start


def timed_measure(*args: Any, **kwargs: Any) -> Any:
    """``measure`` as the callback calls it, timed into the panel running it."""
    start = time.perf_counter()
    try:
        return _measure(*args, **kwargs)
    finally:
        ACTIVE[-1].clock["metrics"][-1] += time.perf_counter() - start


ACTIVE: list[TimedCAMPanel] = []
_measure = cam_panel.measure
cam_panel.measure = timed_measure  # the callback's metrics, timed


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
    tensorboard: bool,
    panel_args: dict[str, Any],
) -> tuple[list[float], TimedCAMPanel | None]:
    """Epoch seconds (warm-up dropped) of one fit, and its timed callback (None without)."""
    pl.seed_everything(0, verbose=False)
    data = CUBDataModule(**{**config["data"], "root": str(root), **data_overrides})
    module_class = PlainEmbeddingNet if panel_args.get("target_layer") else MODULES[config["model"]["class_path"]]
    module = module_class(**config["model"]["init_args"], num_classes=data.num_classes, class_names=data.class_names)
    timer = EpochTimer()
    panel = TimedCAMPanel(**panel_args) if with_panel else None
    if panel is not None:
        ACTIVE.append(panel)
    wandb_logger = WandbLogger(project="cubcam-bench", save_dir=str(work), offline=True)
    logger = [wandb_logger, TensorBoardLogger(work, name="tensorboard")] if tensorboard else wandb_logger
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
    wandb_logger.experiment.finish()
    return timer.seconds[1:], panel


def scenario(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if name.startswith("demo-"):
        kind = name.split("-", 1)[1]
        root = work / "demo_cub40"
        if not (root / "CUB_200_2011").exists():
            make_synthetic_cub(root, classes=8, per_class=40, size=128, seed=0)
        config, data_overrides, trainer_overrides = demo_config(kind), {}, {}
    else:
        root = work / f"cub_sized_{args.cub_size}"
        if not (root / "CUB_200_2011").exists():
            start = time.perf_counter()
            make_synthetic_cub(root, classes=200, per_class=58, size=args.cub_size, seed=0)
            print(f"  (wrote the CUB-sized synthetic set in {time.perf_counter() - start:.0f} s)", flush=True)
        config = demo_config("embedding")
        data_overrides = {"image_size": args.cub_size, "batch_size": 64, "val_fraction": 0.0}  # validate on 5,800
        trainer_overrides = {"limit_train_batches": 2}
    panel_args: dict[str, Any] = {}
    if name == "cub-val-layer":
        panel_args = {"target_layer": "net.backbone.layer4", "method": "embeddingcam"}
        panel_args["metrics_subset"] = args.layer_subset
    results: dict[str, list[float]] = {"without": [], "with": []}
    inside: dict[str, list[float]] = {}
    metric_images = 0
    for side in ("without", "with", "with", "without"):
        seconds, panel = run(
            config,
            root,
            work / "runs",
            args.epochs,
            side == "with",
            data_overrides,
            trainer_overrides,
            args.tensorboard,
            panel_args,
        )
        results[side] += seconds
        if panel is not None:  # warm-up epochs dropped, as for the epoch times (the evolution: once per fit)
            for key, times in panel.clock.items():
                inside.setdefault(key, []).extend(times if key.startswith("evolution") else times[1:])
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
        default=["demo-classifier", "demo-embedding", "cub-val-embedding", "cub-val-layer"],
        choices=["demo-classifier", "demo-embedding", "cub-val-embedding", "cub-val-layer"],
    )
    parser.add_argument("--layer-subset", type=int, default=None, help="cub-val-layer's metric subset")
    parser.add_argument("--cub-size", type=int, default=64, help="image size of the CUB-sized validation set")
    parser.add_argument(
        "--no-tensorboard",
        dest="tensorboard",
        action="store_false",
        help="W&B only (default: W&B and TensorBoard, on both sides)",
    )
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
            inside, metrics, panel = (statistics.median(r["inside"][part]) for part in ("all", "metrics", "panel"))
            print(
                f"{r['name']}: {r['train']} train / {r['val']} val images at {r['size']} px\n"
                f"  epoch without {without:7.2f} s  ({', '.join(f'{s:.2f}' for s in r['results']['without'])})\n"
                f"  epoch with    {with_:7.2f} s  ({', '.join(f'{s:.2f}' for s in r['results']['with'])})\n"
                f"  overhead {100 * (with_ / without - 1):+.1f}% of the epoch; time inside the callback "
                f"{inside:.3f} s = {100 * inside / without:.1f}%  "
                f"(target <= {5 if r['name'] == 'cub-val-layer' else 3}%)\n"
                f"  inside: metrics {metrics:.3f} s over {r['metric_images']} images "
                f"({1000 * metrics / max(r['metric_images'], 1):.2f} ms each), panel {panel:.3f} s "
                f"(render + sinks); within 3% from epochs of {inside / 0.03:.1f} s",
                flush=True,
            )
            for key, times in r["inside"].items():
                if key not in ("all", "metrics", "panel"):
                    seconds = statistics.median(times)
                    every = "at the end of fit" if key.startswith("evolution") else "per epoch"
                    print(
                        f"    sink {key:<28} {seconds:.3f} s {every} = {100 * seconds / without:.2f}% of an epoch"
                        + ("  (target <= 0.5%)" if key == "TensorBoard" else ""),
                        flush=True,
                    )


if __name__ == "__main__":
    main()
