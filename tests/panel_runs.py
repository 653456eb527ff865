"""Helpers of the CAMPanel tests (tests/callbacks): the real modules on a tiny synthetic CUB, a plain
Lightning Trainer, W&B offline runs read back from their transaction log."""

from __future__ import annotations

import cubcam.cams  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import re
import threading
import warnings
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger
from wandb_records import finished_log, history_rows

from cubcam.callbacks import CAMPanelWarning
from cubcam.callbacks.epoch_maps import METRIC_KEYS
from cubcam.callbacks.panel_render import MIN_TILE
from cubcam.callbacks.picture_thread import THREAD_NAME
from cubcam.callbacks.sinks import PANEL_KEY
from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.modules import Classifier, EmbeddingNet

SIZE = 64  # image_size: 4x4 CAMs at output stride 16
TILE = SIZE * -(-MIN_TILE // SIZE)  # a panel cell's side: images under MIN_TILE px are enlarged a whole factor


LAYER = "net.backbone.layer4"  # the target_layer path, on cubcam's own module (treated as one without the protocol)


def data_for(root: Path, kind: str, **kwargs) -> CUBDataModule:
    """The tests' data: validation on the test split (``val_fraction=0``), so panels and metrics see the whole
    split these tests count on (the held-out split itself is tested in test_data.py and test_train.py)."""
    sampler = {"sampler": "m_per_class", "m_per_class": 4} if kind == "embedding" else {}
    kwargs = {"val_fraction": 0.0, **kwargs}
    return CUBDataModule(root=str(root), image_size=SIZE, batch_size=8, num_workers=0, **sampler, **kwargs)


def module_for(kind: str, data: CUBDataModule, **kwargs) -> pl.LightningModule:
    common = dict(arch="resnet18", output_stride=16, num_classes=data.num_classes, class_names=data.class_names)
    kwargs = {"lr": 2e-3, **kwargs}
    if kind == "classifier":
        return Classifier(**common, **kwargs)
    return EmbeddingNet(**common, embedding_dim=32, **kwargs)


def trainer_for(work: Path, epochs: int, callbacks: list[pl.Callback], logger=False, **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        default_root_dir=str(work),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    return pl.Trainer(**{**options, **kwargs}, callbacks=callbacks)


def wandb_logger(work: Path, **kwargs) -> WandbLogger:
    return WandbLogger(project="cubcam", save_dir=str(work), offline=True, **kwargs)


def finished_run(logger: WandbLogger) -> Path:
    """Flush the run; its folder (``.../wandb/offline-run-<time>-<id>``)."""
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    return run_dir


def panel_rows(run_dir: Path) -> list[dict]:
    return [row for row in history_rows(finished_log(run_dir)) if PANEL_KEY in row]


def panel_indices(row: dict) -> list[int]:
    """The birds of a logged panel, from its grid's caption (``epoch N: #i #j ...``)."""
    return [int(i) for i in re.findall(r"#(\d+)", row[PANEL_KEY]["caption"])]


class CamMetrics(pl.Callback):
    """Test probe: the CAM metrics in ``trainer.callback_metrics`` after each validation epoch, ``{epoch: {key:
    value}}`` (an epoch without them has none)."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict[str, float]] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        found = {k: float(v) for k, v in trainer.callback_metrics.items() if k in METRIC_KEYS}
        if found and not trainer.sanity_checking:
            self.epochs[trainer.current_epoch] = found


def campanel_warnings(records: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in records if issubclass(w.category, CAMPanelWarning)]


def picture_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]
