"""CAMPanel's picture thread: a killed run leaves no process and resumes its evolution, an exception or Ctrl-C
logs what is drawn and leaves no thread, a slow picture is dropped with one line, a failing one is a warning,
a bug is raised.

Run as a script (``python tests/callbacks/test_panel_threads.py kill OUT ROOT``) it is the killed run."""

from __future__ import annotations

import cubcam.cams  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from panel_runs import CamMetrics, campanel_warnings, data_for, module_for, picture_threads, trainer_for

from cubcam.callbacks import CAMPanel, CAMPanelWarning
from cubcam.callbacks.picture_thread import THREAD_NAME

# These tests validate on the test split on purpose (val_fraction=0: every image of a tiny CUB counts).
pytestmark = pytest.mark.filterwarnings("ignore:val_fraction is 0:cubcam.CubcamWarning")


class Kill(pl.Callback):
    """Test probe: SIGKILL (nothing runs on the way out) when epoch ``epoch`` starts, while its picture thread may
    still be drawing the epoch before."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            (Path(trainer.default_root_dir) / "pid").write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def kill_main(out: str, root: str) -> None:
    """The killed run of the test below (a process of its own)."""
    torch.set_num_threads(1)
    data = data_for(Path(root), "classifier")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=Path(out) / "ckpt", save_last=True)
    callbacks = [CAMPanel(num_images=4), Kill(2), ckpt]
    trainer = trainer_for(Path(out), 3, callbacks, enable_checkpointing=True, limit_train_batches=2)
    trainer.fit(module_for("classifier", data), datamodule=data)


def test_a_killed_run_leaves_no_process_and_resumes_with_its_evolution(synthetic_cub, tmp_path):
    """Killed (SIGKILL) as epoch 2 starts: no process of it is left, last.ckpt holds the panel and the thumbnails
    of epochs 0 and 1 (made on the loop's thread, nothing pending), and the resumed run's evolution has every
    epoch once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}  # panel_runs
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "kill", str(tmp_path), str(synthetic_cub)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    killed = int((tmp_path / "pid").read_text())
    survivors = [
        p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == killed
    ]  # its children: re-parented, they would still name it nowhere; none may exist at all
    assert survivors == [] and not Path(f"/proc/{killed}").exists()
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("CAMPanel")]
    assert set(state) == {"panel", "subset", "evolution"} and state["evolution"]["epochs"] == [0, 1]

    data = data_for(synthetic_cub, "classifier")
    resumed_root = tmp_path / "resumed"
    panel = CAMPanel(num_images=4)
    trainer = trainer_for(resumed_root, 3, [panel], limit_train_batches=2)
    trainer.fit(module_for("classifier", data), datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    resumed = sorted(p.name for p in (resumed_root / "cam_panels").glob("epoch_*.png"))
    assert resumed == ["epoch_002.png"] and panel.evolution.epochs == [0, 1, 2]
    assert panel.panel == state["panel"]


def _parent(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


class Raise(pl.Callback):
    def __init__(self, error: BaseException):
        self.error = error

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise self.error


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_exception_or_ctrl_c_logs_the_drawn_panels_and_leaves_no_thread(synthetic_cub, tmp_path, error):
    data = data_for(synthetic_cub, "classifier")
    trainer = trainer_for(tmp_path, 3, [CAMPanel(num_images=4), Raise(error)], limit_train_batches=2)
    with pytest.raises((RuntimeError, SystemExit)):
        trainer.fit(module_for("classifier", data), datamodule=data)
    assert (tmp_path / "cam_panels" / "epoch_000.png").is_file()  # epoch 0's panel was drawn
    assert picture_threads() == []


def test_on_the_way_out_a_slow_picture_is_dropped_with_one_line(synthetic_cub, tmp_path, monkeypatch):
    """An exception while the picture thread is still drawing: the callback waits about EXIT_WAIT seconds, then
    drops the panel with one warning; the metrics of that epoch were logged already."""
    from cubcam.callbacks import cam_panel, picture_thread

    drawing = picture_thread.render

    released = threading.Event()  # epoch 0's picture waits 4 s, or until the test is done with it

    def slow(job):
        if job.epoch == 0:
            released.wait(4)
        return drawing(job)

    monkeypatch.setattr(picture_thread, "render", slow)
    monkeypatch.setattr(cam_panel, "EXIT_WAIT", 0.5)
    data = data_for(synthetic_cub, "classifier")
    logged = CamMetrics()
    trainer = trainer_for(
        tmp_path, 3, [CAMPanel(num_images=4), logged, Raise(RuntimeError("boom"))], limit_train_batches=2
    )
    with pytest.warns(CAMPanelWarning) as caught, pytest.raises(RuntimeError):
        trainer.fit(
            module_for("classifier", data),
            datamodule=data,
        )
    dropped = [m for m in campanel_warnings(caught) if "not yet drawn" in m]
    assert dropped == [
        "CAMPanel: the run ended with 1 panel(s) not yet drawn; they are dropped (the metrics were logged)"
    ]
    assert sorted(logged.epochs) == [0] and not (tmp_path / "cam_panels" / "epoch_000.png").exists()
    released.set()
    for thread in threading.enumerate():  # the dropped picture's thread (a daemon) ends with its picture
        if thread.name.startswith(THREAD_NAME):
            thread.join(10)
    assert picture_threads() == []


def test_a_failing_picture_is_a_warning_per_epoch_and_training_goes_on(synthetic_cub, tmp_path, monkeypatch):
    from cubcam.callbacks import picture_thread

    def broken(*args, **kwargs):
        raise MemoryError("the picture thread ran out of memory")

    monkeypatch.setattr(picture_thread, "render", broken)
    data = data_for(synthetic_cub, "classifier")
    logged = CamMetrics()
    trainer = trainer_for(tmp_path, 2, [CAMPanel(num_images=4), logged], limit_train_batches=2)
    with pytest.warns(CAMPanelWarning) as caught:
        trainer.fit(module_for("classifier", data), datamodule=data)
    failed = [m for m in campanel_warnings(caught) if "could not render the panel" in m]
    assert len(failed) == 2 and "MemoryError: the picture thread ran out of memory" in failed[0], failed
    assert trainer.current_epoch == 2 and picture_threads() == [] and sorted(logged.epochs) == [0, 1]


def test_a_bug_in_the_picture_thread_ends_the_run_with_its_own_error(synthetic_cub, tmp_path, monkeypatch):
    """Only running out of memory and a sink's failure are warnings; a bug raised on the picture thread is raised
    on the loop's thread, as it is, and no thread is left behind."""
    from cubcam.callbacks import picture_thread

    def buggy(*args, **kwargs):
        raise IndexError("a bug in the panel's layout")

    monkeypatch.setattr(picture_thread, "render", buggy)
    data = data_for(synthetic_cub, "classifier")
    trainer = trainer_for(tmp_path, 2, [CAMPanel(num_images=4)], limit_train_batches=2)
    with pytest.raises(IndexError, match="a bug in the panel's layout"):
        trainer.fit(module_for("classifier", data), datamodule=data)
    assert trainer.current_epoch < 2 and picture_threads() == []


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "kill":
    kill_main(sys.argv[2], sys.argv[3])
