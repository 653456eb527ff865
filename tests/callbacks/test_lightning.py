"""Both Lightning namespaces: ``pytorch_lightning`` and ``lightning.pytorch`` (what Lightning's docs teach). A user's
module of either gets CAMPanel's panels and metrics in that namespace's W&B and TensorBoard loggers, BestCheckpoint
and LastCheckpoint write their files, and LightningCLI accepts a config naming cubcam's callbacks."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor
from torchvision.models import resnet18
from wandb_records import finished_log, history_rows

from cubcam.callbacks import CAMPanel, CAMPanelWarning
from cubcam.callbacks.epoch_maps import METRIC_KEYS
from cubcam.callbacks.sinks import PANEL_KEY
from cubcam.train.best_checkpoint import BestCheckpoint
from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.run_folder import LastCheckpoint

# These tests validate on the test split on purpose (val_fraction=0: every image of a tiny CUB counts).
pytestmark = pytest.mark.filterwarnings("ignore:val_fraction is 0:cubcam.CubcamWarning")

NAMESPACES = ["pytorch_lightning", "lightning.pytorch"]
SIZE = 64


def user_module(namespace: str, num_classes: int):
    """A plain classifier written against ``namespace`` (as Lightning's examples write them), knowing nothing of
    cubcam; dict batches with boxes, so the CAM metrics are logged too."""
    lightning = importlib.import_module(namespace)

    class Classifier(lightning.LightningModule):
        def __init__(self, num_classes: int = 4):
            super().__init__()
            self.net = resnet18(num_classes=num_classes)

        def forward(self, images: Tensor) -> Tensor:
            return self.net(images)

        def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
            return F.cross_entropy(self(batch["image"]), batch["label"])

        def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
            logits = self(batch["image"])
            self.log("val/acc", (logits.argmax(1) == batch["label"]).float().mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=2e-3)

    torch.manual_seed(0)
    return Classifier(num_classes)


def loaders(root: Path):
    data = CUBDataModule(root=str(root), image_size=SIZE, batch_size=8, num_workers=0, val_fraction=0.0)
    data.setup("fit")
    return data.train_dataloader(), data.val_dataloader(), data


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_a_module_of_either_namespace_gets_panels_metrics_and_checkpoints(
    namespace, synthetic_cub, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    lightning = importlib.import_module(namespace)
    loggers = importlib.import_module(f"{namespace}.loggers")
    train, val, data = loaders(synthetic_cub)
    wandb_logger = loggers.WandbLogger(project="cubcam", save_dir=str(tmp_path), offline=True)
    tensorboard = loggers.TensorBoardLogger(str(tmp_path), name="tb")
    callbacks = [CAMPanel(num_images=4, target_layer="net.layer4"), BestCheckpoint(monitor="val/acc"), LastCheckpoint()]
    trainer = lightning.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=[wandb_logger, tensorboard],
        callbacks=callbacks,
        limit_train_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    assert all(isinstance(c, (lightning.Callback, lightning.callbacks.Checkpoint)) for c in callbacks)
    trainer.fit(user_module(namespace, data.num_classes), train, val)

    checkpoints = sorted(path.name for path in Path(trainer.checkpoint_callback.dirpath).iterdir())
    assert "last.ckpt" in checkpoints and sum(name.startswith("best-") for name in checkpoints) == 1, checkpoints
    events = EventAccumulator(tensorboard.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images(PANEL_KEY)) == 2  # one panel per epoch, in that namespace's TensorBoardLogger
    wandb_logger.experiment.finish()
    rows = history_rows(finished_log(Path(wandb_logger.experiment.dir).parent))
    assert sorted(row["epoch"] for row in rows if PANEL_KEY in row) == [0, 1]
    assert sorted(row["epoch"] for row in rows if all(key in row for key in METRIC_KEYS)) == [0, 1]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_lightning_cli_of_either_namespace_takes_cubcams_callbacks_from_a_config(namespace, synthetic_cub, tmp_path):
    cli = importlib.import_module(f"{namespace}.cli")
    lightning = importlib.import_module(namespace)
    train, val, data = loaders(synthetic_cub)

    class Data(lightning.LightningDataModule):
        def train_dataloader(self):
            return train

        def val_dataloader(self):
            return val

    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "max_epochs": 1,
                    "limit_train_batches": 1,
                    "accelerator": "cpu",
                    "logger": False,
                    "default_root_dir": str(tmp_path),
                    "enable_progress_bar": False,
                    "callbacks": [
                        {
                            "class_path": "cubcam.callbacks.CAMPanel",
                            "init_args": {"num_images": 4, "target_layer": "net.layer4"},
                        },
                        {
                            "class_path": "cubcam.train.best_checkpoint.BestCheckpoint",
                            "init_args": {"monitor": "val/acc"},
                        },
                        {"class_path": "cubcam.train.run_folder.LastCheckpoint"},
                    ],
                },
                "model": {"num_classes": data.num_classes},
            }
        )
    )
    module_class = type(user_module(namespace, data.num_classes))
    run = cli.LightningCLI(module_class, Data, args=["fit", "--config", str(config)], save_config_callback=None)
    assert [type(c).__name__ for c in run.trainer.callbacks if type(c).__module__.startswith("cubcam")] == [
        "CAMPanel",
        "BestCheckpoint",
        "LastCheckpoint",
    ]
    assert (tmp_path / "cam_panels" / "epoch_000.png").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_a_logger_no_sink_serves_is_named_once_with_where_the_panels_go(synthetic_cub, tmp_path):
    from pytorch_lightning import Trainer
    from pytorch_lightning.loggers import CSVLogger

    train, val, data = loaders(synthetic_cub)
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=logger,
        callbacks=[CAMPanel(num_images=4, target_layer="net.layer4")],
        limit_train_batches=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    with pytest.warns(CAMPanelWarning) as caught:
        trainer.fit(user_module("pytorch_lightning", data.num_classes), train, val)
    told = [str(w.message) for w in caught if "cannot show the panels" in str(w.message)]
    assert told == [
        f"CAMPanel: CSVLogger cannot show the panels (cubcam logs images to W&B, TensorBoard and MLflow); they go "
        f"to {Path(logger.log_dir) / 'cam_panels'} as PNG files instead"
    ]
    assert (Path(logger.log_dir) / "cam_panels" / "epoch_000.png").is_file()
