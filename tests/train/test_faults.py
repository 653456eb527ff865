"""Nothing lost, through ``cubcam fit`` on the shared tiny synthetic CUB: a disk that fills mid-save, SIGTERM and
Ctrl-C, a resume from any checkpoint (a best one, a copied run folder, a finished run), a config that disagrees with
its checkpoint, and files that are no Lightning checkpoint."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from cli_runs import fit_args, only, read_record

from cubcam.cams import files
from cubcam.train.cli import main

DISK = 320_000_000  # bytes: epoch 0's two checkpoints (136 MB each at 64 px) fit, a third does not


class SendSignal(pl.Callback):
    """Test probe given to the CLI: sends this process ``name`` after training step ``step``."""

    def __init__(self, name: str, step: int):
        self.name, self.step = name, step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.name))


class TermInTheLastValidation(pl.Callback):
    """Test probe given to the CLI: sends this process SIGTERM as the last epoch's validation starts (after the
    last training step)."""

    def on_validation_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == (trainer.max_epochs or 0) - 1:
            os.kill(os.getpid(), signal.SIGTERM)


class InterruptTheDrain(pl.Callback):
    """Test probe given to the CLI: Ctrl-C ``delay`` seconds after training ends, while CAMPanel waits for its last
    picture at the end of fit; records whether a test ran."""

    def __init__(self, out: str, delay: float = 1.0):
        self.out, self.delay = Path(out), delay

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        threading.Timer(self.delay, os.kill, (os.getpid(), signal.SIGINT)).start()

    def on_test_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        (self.out / "tested").touch()


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder with room for ``DISK`` bytes: a tmpfs of that size where this process may mount one (root on
    Linux), else the same limit injected into cubcam's writes (``ENOSPC`` once the folder would hold more)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = (
        shutil.which("mount") is not None
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        fdopen = os.fdopen

        def used() -> int:
            return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())

        class Filling:
            def __init__(self, file):
                self.file = file

            def write(self, data) -> int:
                if used() + len(data) > DISK:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return self.file.write(data)

            def __getattr__(self, name):
                return getattr(self.file, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.file.__exit__(*exc)

        def limited(descriptor, *args, **kwargs):
            file = fdopen(descriptor, *args, **kwargs)
            inside = Path(os.readlink(f"/proc/self/fd/{descriptor}")).is_relative_to(folder)
            return Filling(file) if inside else file

        monkeypatch.setattr(files.os, "fdopen", limited)
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_disk_that_fills_mid_save_keeps_every_checkpoint_whole(tiny_cub: Path, offline: Path, small_disk: Path):
    """Lightning's default writes a temporary file in $TMPDIR and moves it, which across file systems is a copy over
    ``last.ckpt``: a full disk left it truncated. Here the run stops with one line naming the file and the free
    space, and every checkpoint left is whole (the previous ``last.ckpt`` among them)."""
    args = fit_args(["demo/classifier.yaml"], tiny_cub, small_disk, "record", "--trainer.max_epochs", "3", wandb=False)
    with pytest.raises(SystemExit) as stopped:
        main(args)
    message = str(stopped.value.code)
    assert message.startswith("error: could not write ") and ".ckpt" in message, message
    assert "No space left on device" in message and " free)" in message, message
    folder = small_disk / "runs" / "checkpoints"
    left = sorted(folder.iterdir())
    assert [path.suffix for path in left] == [".ckpt"] * len(left), left  # no partial file under any name
    assert "last.ckpt" in [path.name for path in left]
    for path in left:
        assert torch.load(path, weights_only=True, map_location="cpu")["epoch"] == 0  # whole, from epoch 0
    assert (small_disk / "runs" / "cam_panels" / "epoch_000.png").stat().st_size > 0


def test_ctrl_c_while_the_last_picture_is_drawn_exits_130_without_testing(
    tiny_cub: Path, offline: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The wait for the picture thread at the end of fit is interruptible: Ctrl-C there ends the run with 130 and
    no test; on the way out CAMPanel waits about two seconds, then drops the picture with one line."""
    from cubcam.callbacks import picture_thread

    drawing = picture_thread.render

    released = threading.Event()  # the picture waits 8 s, or until the test is done with it

    def slow(job):
        released.wait(8)
        return drawing(job)

    monkeypatch.setattr(picture_thread, "render", slow)
    probe = ["--trainer.callbacks+=test_faults.InterruptTheDrain", f"--trainer.callbacks.out={offline}"]
    args = fit_args(["demo/classifier.yaml"], tiny_cub, offline, "drain", "--trainer.max_epochs", "1", wandb=False)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's Ctrl-C, however pytest runs
    try:
        with (
            pytest.warns(UserWarning, match="panel.s. not yet drawn; they are dropped"),
            pytest.raises(SystemExit) as stopped,
        ):
            main([*args, *probe, "--trainer.limit_train_batches", "1"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.value.code == 130
    assert "after its last training step (max_epochs=1, step " in caplog.text and "mid-epoch" not in caplog.text
    assert not (offline / "tested").exists()  # without the interrupt: the 8 s picture, then a test and exit 0
    released.set()
    for thread in threading.enumerate():  # the dropped picture's thread (a daemon) ends here, not in another test
        if thread.name.startswith(picture_thread.THREAD_NAME):
            thread.join(10)


@pytest.mark.parametrize(("name", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_saves_a_resumable_last_checkpoint_and_exits_with_its_status(
    name: str, status: int, tiny_cub: Path, offline: Path, caplog: pytest.LogCaptureFixture
) -> None:
    epochs, step = 3, 5  # 3 steps an epoch: step 5 is mid-epoch 1
    probe = ["--trainer.callbacks+=test_faults.SendSignal", f"--trainer.callbacks.name={name}"]
    args = fit_args(
        ["demo/classifier.yaml"], tiny_cub, offline, "first", "--trainer.max_epochs", str(epochs), wandb=False
    )
    # A terminal's Ctrl-C, however pytest was started (a background job ignores SIGINT); Lightning ignores further
    # Ctrl-Cs once it has one, so the handler is put back afterwards.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as stopped:
            main([*args, *probe, f"--trainer.callbacks.step={step}"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.value.code == status  # Lightning alone: 0 for SIGTERM, 1 for Ctrl-C
    last = offline / "runs" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True, map_location="cpu")
    assert saved["global_step"] == step and saved["epoch"] == 1
    assert f"resume with: cubcam fit --config {offline / 'runs' / 'config.yaml'} --ckpt_path {last}" in caplog.text
    assert "mid-epoch" in caplog.text
    if name == "SIGINT":
        return
    resumed = fit_args(
        ["demo/classifier.yaml"], tiny_cub, offline, "resumed", "--trainer.max_epochs", str(epochs), wandb=False
    )
    main([*resumed, "--ckpt_path", str(last)])
    resumed_state = torch.load(last, weights_only=True, map_location="cpu")
    # Epoch 1 went on where it stopped (its last batch), then epoch 2 ran: every step once.
    assert read_record(offline / "resumed")["epochs"] == [2]
    assert resumed_state["epoch"] == epochs - 1 and resumed_state["global_step"] == 3 * epochs


def test_a_signal_after_the_last_training_step_resumes_to_what_the_run_had_left(
    tiny_cub: Path, offline: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM in the last epoch's validation: the checkpoint is not "mid-epoch", and its resume does not say
    "nothing to train" but runs what the run had left (the CAM evolution, the test of the best checkpoint), after
    which the run is finished."""
    args = fit_args(["demo/classifier.yaml"], tiny_cub, offline, "first", "--trainer.max_epochs", "2", wandb=False)
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--trainer.callbacks+=test_faults.TermInTheLastValidation"])
    assert stopped.value.code == 143
    run = offline / "runs"
    last = run / "checkpoints" / "last.ckpt"
    assert f"SIGTERM: saved {last} after its last training step (max_epochs=2, step 6); resuming it runs" in caplog.text
    assert "mid-epoch" not in caplog.text
    assert not (run / "cam_panels" / "evolution.gif").exists() and not (run / "finished.json").exists()

    caplog.clear()
    main(
        [
            *fit_args(["demo/classifier.yaml"], tiny_cub, offline, "left", "--trainer.max_epochs", "2", wandb=False),
            "--ckpt_path",
            str(last),
        ]
    )
    assert f"{last} finished training (2 epochs, 6 steps; max_epochs=2) but not its run: running" in caplog.text
    assert read_record(offline / "left")["epochs"] == []  # no epoch trained again
    assert (run / "cam_panels" / "evolution.gif").stat().st_size > 0
    record = json.loads((run / "finished.json").read_text())
    assert (record["epochs"], record["steps"]) == (2, 6) and 0 <= record["test"]["test/acc"] <= 1

    caplog.clear()
    main(
        [
            *fit_args(["demo/classifier.yaml"], tiny_cub, offline, "again", "--trainer.max_epochs", "2", wandb=False),
            "--ckpt_path",
            str(last),
        ]
    )
    assert "has finished its run (2 epochs, 6 steps; max_epochs=2): nothing to train" in caplog.text


def test_resume_from_any_checkpoint_continues_its_run_folder(
    tiny_cub: Path, offline: Path, caplog: pytest.LogCaptureFixture
) -> None:
    main(fit_args(["demo/classifier.yaml"], tiny_cub, offline, "first", "--trainer.max_epochs", "2"))
    run = only(list((offline / "runs" / "cubcam").glob("*")))
    checkpoints = run / "checkpoints"
    # One config per run, beside its checkpoints (LightningCLI wrote runs/config.yaml, shared by every W&B run).
    assert (run / "config.yaml").is_file() and not (offline / "runs" / "config.yaml").exists()
    assert f"checkpoint: latest {checkpoints / 'last.ckpt'}" in caplog.text  # not "latest -"

    # A copied run folder (the recovery path after a corrupt last.ckpt) resumes there: its last.ckpt is the newest
    # state (no last-v1.ckpt beside a stale one) and one best file is kept, as save_top_k says.
    copy = offline / "copy" / "runs" / "cubcam" / run.name
    shutil.copytree(run, copy)
    copied = ["--trainer.logger.init_args.save_dir", str(offline / "copy" / "runs")]
    last = copy / "checkpoints" / "last.ckpt"
    main(
        [
            *fit_args(["demo/classifier.yaml"], tiny_cub, offline, "copied", "--trainer.max_epochs", "3", *copied),
            "--ckpt_path",
            str(last),
        ]
    )
    assert read_record(offline / "copied")["epochs"] == [2]
    names = sorted(path.name for path in (copy / "checkpoints").iterdir())
    assert names == sorted(["last.ckpt", only([n for n in names if n.startswith("best-")])]), names
    state = torch.load(last, weights_only=True, map_location="cpu")
    assert state["epoch"] == 2
    best_state = next(v for k, v in state["callbacks"].items() if "'monitor': 'val/acc'" in k)
    assert Path(best_state["best_model_path"]).parent == copy / "checkpoints"  # re-rooted into the copy

    # A run resumed from its best checkpoint overwrites its own files: no -v1 twins.
    best = only(list(checkpoints.glob("best-*.ckpt")))
    main(
        [
            *fit_args(["demo/classifier.yaml"], tiny_cub, offline, "resumed", "--trainer.max_epochs", "3"),
            "--ckpt_path",
            str(best),
        ]
    )
    assert not [path for path in checkpoints.iterdir() if "-v" in path.name]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")["epoch"] == 2

    # A finished run says so and does nothing twice (no epoch, no second test, no second evolution).
    caplog.clear()
    main(
        [
            *fit_args(["demo/classifier.yaml"], tiny_cub, offline, "again", "--trainer.max_epochs", "3"),
            "--ckpt_path",
            str(checkpoints / "last.ckpt"),
        ]
    )
    assert "has finished its run (3 epochs" in caplog.text and "Raise --trainer.max_epochs" in caplog.text
    assert not (offline / "again").exists()  # the Recorder's on_fit_end never ran: fit was not called


def test_a_checkpoint_that_cannot_resume_the_config_is_one_line(tiny_cub: Path, offline: Path) -> None:
    args = fit_args(["demo/classifier.yaml"], tiny_cub, offline, "first", "--trainer.max_epochs", "1", wandb=False)
    main(args)
    last = offline / "runs" / "checkpoints" / "last.ckpt"

    with pytest.raises(SystemExit) as stopped:  # an embedding net's config for a classifier's checkpoint
        main([*fit_args(["demo/embedding.yaml"], tiny_cub, offline, "x", wandb=False), "--ckpt_path", str(last)])
    assert str(stopped.value.code) == (
        f"error: {last} is a checkpoint of Classifier (resnet18), but the config asks for EmbeddingNet (resnet18): "
        f"resume it with the config it was trained with"
    )
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--model.init_args.arch", "resnet34", "--ckpt_path", str(last)])
    assert "of Classifier (resnet18), but the config asks for Classifier (resnet34)" in str(stopped.value.code)

    torch.save(torch.load(last, weights_only=True)["state_dict"], offline / "weights.pt")
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--ckpt_path", str(offline / "weights.pt")])
    assert (
        str(stopped.value.code)
        == f"error: {offline / 'weights.pt'} is not a Lightning checkpoint (no 'state_dict' entry)"
    )
    (offline / "cut.ckpt").write_bytes(last.read_bytes()[:100_000])
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--ckpt_path", str(offline / "cut.ckpt")])
    assert str(stopped.value.code).startswith(f"error: checkpoint {offline / 'cut.ckpt'} is cut short or damaged")

    with warnings.catch_warnings(record=True) as caught:  # overrides a resume cannot honour: one warning
        warnings.simplefilter("always")
        main([*args, "--trainer.max_epochs", "2", "--model.init_args.lr", "0.1", "--ckpt_path", str(last)])
    ignored = [str(w.message) for w in caught if "config values are ignored" in str(w.message)]
    assert ignored == [
        f"resuming {last} keeps the model settings it was trained with; these config values are "
        f"ignored: lr=0.1 (kept: 0.002)"
    ]


def test_best_files_of_an_abandoned_timeline_are_removed_so_save_top_k_holds(tmp_path: Path) -> None:
    """Resumed from best-epoch=1.ckpt, a run that had gone on to best-epoch=3.ckpt left both (save_top_k: 1)."""
    from cubcam.train.best_checkpoint import BestCheckpoint

    for name in ("best-epoch=1.ckpt", "best-epoch=3.ckpt", "last.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    callback = BestCheckpoint(dirpath=tmp_path, monitor="val/acc")
    callback._fitting = True  # as setup sets it for fit (a test restoring a best checkpoint tidies nothing)
    kept = str(tmp_path / "best-epoch=1.ckpt")
    callback.load_state_dict(
        {
            "dirpath": str(tmp_path),
            "best_model_path": kept,
            "best_model_score": torch.tensor(0.5),
            "best_k_models": {kept: torch.tensor(0.5)},
            "kth_best_model_path": kept,
            "kth_value": torch.tensor(0.5),
            "last_model_path": "",
        }
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best-epoch=1.ckpt", "last.ckpt"]
