"""Helpers of the tests that run ``cubcam fit`` (tests/train, tests/callbacks): the probe callback the CLI
is given, the command line, and what a run wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from wandb_records import history_rows

from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.inspection.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SIZE, BATCH, M = 64, 8, 4  # tiny_cub's image side (conftest.CLI_SIZE), the batch, m per class


class Recorder(pl.Callback):
    """Test probe given to the CLI: writes ``<out>/rank<r>.json`` with the epochs trained, every training batch's
    labels and the final logged metrics of that process."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.epochs: list[int] = []
        self.batches: list[list[int]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.epochs.append(trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.batches.append(batch["label"].tolist())

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        record = {
            "epochs": self.epochs,
            "batches": self.batches,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def read_record(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


def fit_args(configs: list[str], root: Path, work: Path, record: str, *extra: str, wandb: bool = True) -> list[str]:
    args = ["fit"]
    for config in configs:
        args += ["--config", str(REPO / "configs" / config)]
    args += [
        "--data.root",
        str(root),
        "--data.image_size",
        str(SIZE),
        "--data.batch_size",
        str(BATCH),
        "--data.num_workers",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.callbacks+=cli_runs.Recorder",
        f"--trainer.callbacks.out={work / record}",
    ]
    if wandb:
        args += ["--trainer.logger.init_args.save_dir", str(work / "runs")]
    else:
        args += ["--trainer.logger", "false", "--trainer.default_root_dir", str(work / "runs")]
    return args + list(extra)


def split_outputs(checkpoint: Path, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, labels) of a reloaded checkpoint over a whole split of the data it was trained on (rebuilt from its
    saved datamodule settings, validation share and seed included), computed here by hand."""
    loaded = load_checkpoint(checkpoint)
    settings = {k: v for k, v in loaded.data_hparams.items() if not k.startswith("_")}  # drop Lightning's _instantiator
    data = CUBDataModule(**{**settings, "num_workers": 0})
    data.setup(None)
    module = loaded.module.eval()
    outputs, labels = [], []
    with torch.no_grad():
        for batch in data.val_dataloader() if split == "val" else data.test_dataloader():
            outputs.append(module(batch["image"]))
            labels.append(batch["label"])
    return torch.cat(outputs), torch.cat(labels)


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


def assert_logged_every_epoch(run_file: Path, epochs: int, *keys: str) -> None:
    """The W&B log holds the module's metrics, and the config's CAMPanel's panel and CAM metrics, every epoch."""
    rows = history_rows(run_file)
    assert any("train/loss" in row for row in rows)  # per step, every log_every_n_steps
    for key in (*keys, "val/cam_max_box_acc", "val/cam_pointing_game"):
        assert sorted({row["epoch"] for row in rows if key in row}) == list(range(epochs)), key
    assert sum("val/cam_panel" in row for row in rows) == epochs


def run_python(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python <argv>`` in a process of its own (DDP's ranks, a script), checked to exit 0."""
    done = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
