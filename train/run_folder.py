"""One run, one folder: checkpoints written atomically, resumable from any of them, interrupted runs resumable.

``<save_dir>/<project or name>/<run id or version_N>/`` holds a run's ``checkpoints/`` (``last.ckpt``, the newest
state; ``best-epoch=N.ckpt``), its ``config.yaml`` and its ``cam_panels/``. What keeps it whole:

* :class:`AtomicCheckpointIO`: Lightning's ``TorchCheckpointIO`` writes through fsspec, which writes a temporary file
  in ``$TMPDIR`` and moves it; across file systems that move is a copy over the target, so a disk that fills
  mid-save truncates ``last.ckpt``. This one writes next to the target and renames (``cubcam.cams.files``).
* :class:`RunFolderCheckpoint` (the base of ``LastCheckpoint`` and ``BestCheckpoint``): no ``-v1`` twins (a resumed
  run overwrites its own files), the atomic IO installed at ``setup``, a copied run folder resumes its best-k
  bookkeeping, and best files of an abandoned timeline (epochs after the checkpoint a run was resumed from) are
  removed so that ``save_top_k`` holds.
* :class:`LastCheckpoint`: ``last.ckpt`` every epoch, and on SIGTERM or Ctrl-C a resumable one, with the command that
  resumes it.
* :class:`RunConfig`: the config each run was started with, beside its checkpoints (one per run, never another
  run's).
* ``finished.json`` (:func:`write_finished`): written once a run's training, CAM evolution and test have all run; a
  checkpoint whose training is done resumes to what its run had left unless its run folder says it finished.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from jsonargparse import Namespace
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, SaveConfigCallback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from cubcam import CubcamWarning
from cubcam.cams.files import write_text, write_with
from cubcam.namespaces import dual

SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number: what shells and schedulers expect
FINISHED = "finished.json"  # in the run folder: the run's training, CAM evolution and test all ran


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes never leave a partial file under the checkpoint's name.

    Raises:
        cubcam.cams.files.WriteFailed: a write that failed (its message names the path and the free space); the
            previous checkpoint of that name is intact.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: fsspec's own
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_with(path, lambda file: torch.save(checkpoint, file))


if TYPE_CHECKING:  # typed with pytorch_lightning's classes; lightning.pytorch's are the same code
    _ModelCheckpoint = ModelCheckpoint
else:
    _ModelCheckpoint = dual(ModelCheckpoint)  # a checkpoint callback to both Lightning namespaces' Trainer


class RunFolderCheckpoint(_ModelCheckpoint):
    """ModelCheckpoint that keeps one run's checkpoints in one folder, whatever it is resumed from.

    Args:
        enable_version_counter: False (Lightning's default is True): a resumed run overwrites its own
            ``last.ckpt`` instead of writing ``last-v1.ckpt`` beside a stale one.
        **kwargs: ModelCheckpoint's own.
    """

    def __init__(self, enable_version_counter: bool = False, **kwargs: Any):
        super().__init__(enable_version_counter=enable_version_counter, **kwargs)
        self._fitting = False  # set at setup: a test restoring a best checkpoint's state must not tidy the folder

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._fitting = stage == "fit"
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not a user's own
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so that runs checkpointed before these classes existed resume their best score.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        saved = state.get("dirpath")
        if saved is not None and self.dirpath is not None and Path(saved) != Path(self.dirpath):
            state = self._moved(state, Path(saved), Path(self.dirpath))
        super().load_state_dict(state)
        self._remove_abandoned()

    def _moved(self, state: dict[str, Any], saved: Path, here: Path) -> dict[str, Any]:
        """The state of a run folder that was copied or moved (from ``saved`` to ``here``): its paths re-rooted,
        when every file it names is here too. Otherwise (another run's checkpoint) it is left to Lightning, which
        keeps only ``best_model_path``."""

        def moved(path: str) -> str:
            return str(here / Path(path).relative_to(saved)) if path and Path(path).is_relative_to(saved) else path

        named = [*state.get("best_k_models", {}), state.get("best_model_path", ""), state.get("last_model_path", "")]
        if not all(Path(moved(path)).is_file() for path in named if path):
            return state
        state["best_k_models"] = {moved(path): score for path, score in state.get("best_k_models", {}).items()}
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if state.get(key):
                state[key] = moved(state[key])
        state["dirpath"] = str(here)
        return state

    def _remove_abandoned(self) -> None:
        """Files of this callback's pattern that its restored state does not list were written after the
        checkpoint this run resumed from, by the timeline the resume abandoned: removed, so ``save_top_k`` holds."""
        if (
            not self._fitting
            or self.save_top_k < 0
            or self.dirpath is None
            or self.monitor is None
            or not self.best_k_models
        ):
            return
        pattern = _glob(self.filename or "") + self.FILE_EXTENSION
        kept = {Path(path).resolve() for path in self.best_k_models}
        for path in sorted(Path(self.dirpath).glob(pattern)):
            if path.resolve() not in kept:
                path.unlink(missing_ok=True)
                rank_zero_info(f"removed {path}: written after the checkpoint this run resumed from")


def _glob(filename: str) -> str:
    """``best-{epoch}`` -> ``best-*``: Lightning's filename template (``{name}`` or ``{name:fmt}`` fields) as a
    glob pattern."""
    return re.sub(r"\{[^{}]*\}", "*", filename)


class LastCheckpoint(RunFolderCheckpoint):
    """``last.ckpt``, the run's newest state, every epoch; on SIGTERM or Ctrl-C a resumable one as well.

    Lightning 2.6's ``save_last`` refreshes ``last.ckpt`` only on a new best, hence a checkpoint of its own. An
    interrupted run's checkpoint is written where Lightning stopped, usually mid-epoch: Lightning warns when it is
    resumed, and the resumed run repeats that epoch's remaining batches in another order (not bit-identical to a
    run that was never interrupted).

    Args:
        filename: ``last``.
        **kwargs: ModelCheckpoint's own (``monitor`` stays None: the newest, not the best).
    """

    def __init__(self, filename: str = "last", **kwargs: Any):
        super().__init__(filename=filename, **kwargs)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        signal = signal_name(exception)
        if signal is None or self.dirpath is None or trainer.state.fn != TrainerFn.FITTING:
            return
        path = Path(self.dirpath) / f"{self.filename}{self.FILE_EXTENSION}"
        try:
            trainer.save_checkpoint(path)
        except Exception as error:  # the save (I/O): the signal, not this, must end the run
            rank_zero_warn(f"{signal}: could not save {path}: {error}", category=CubcamWarning)
            return
        batches = trainer.fit_loop.epoch_loop.batch_progress
        epochs, steps = epochs_trained(trainer.fit_loop.state_dict()), trainer.global_step
        limit = training_limit(epochs, steps, trainer.max_epochs, trainer.max_steps)
        if limit is not None:
            where = (
                f"after its last training step ({limit}, step {steps}); resuming it runs what the run had left: the "
                "CAM evolution and the test of the best checkpoint"
            )
        else:
            where = f"at epoch {trainer.current_epoch}, step {steps}"
            if batches.current.completed > 0 and not batches.is_last_batch:
                where += " (mid-epoch: Lightning warns on resuming it, and the resumed run is not bit-identical)"
        config = path.parent.parent / "config.yaml"
        command = f"cubcam fit --config {config}" if config.is_file() else "cubcam fit <the same arguments>"
        rank_zero_info(f"{signal}: saved {path} {where}\nresume with: {command} --ckpt_path {path}")


def epochs_trained(fit_loop: dict[str, Any]) -> int:
    """The epochs whose training is done, from Lightning's fit-loop state (``trainer.fit_loop.state_dict()``, or a
    checkpoint's ``loops["fit_loop"]``): its ``processed`` count (which an epoch-end checkpoint already includes),
    plus the epoch whose last training batch ran but which a signal ended before Lightning counted it (in its
    validation)."""
    epochs = fit_loop.get("epoch_progress", {}).get("current", {})
    batches = fit_loop.get("epoch_loop.batch_progress", {})
    processed = int(epochs.get("processed", 0))
    uncounted = (
        int(epochs.get("started", 0)) > processed
        and bool(batches.get("is_last_batch"))
        and int(batches.get("current", {}).get("completed", 0)) > 0
    )
    return processed + uncounted


def training_limit(epochs: int, steps: int, max_epochs: int | None, max_steps: int) -> str | None:
    """The limit (``"max_epochs=8"``, ``"max_steps=100"``) that ``epochs`` trained and ``steps`` have reached, or
    None while training has some left (``-1``: no limit, as Lightning reads it)."""
    if 0 <= max_steps <= steps:
        return f"max_steps={max_steps}"
    if max_epochs is not None and 0 <= max_epochs <= epochs:
        return f"max_epochs={max_epochs}"
    return None


def run_folder(trainer: pl.Trainer) -> Path | None:
    """The run's folder (the parent of its checkpoint callback's ``dirpath``), None without a checkpoint callback."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    return Path(dirpath).parent if dirpath else None


def write_finished(folder: Path, epochs: int, steps: int, best: str, test: dict[str, float]) -> None:
    """``<run folder>/finished.json``: the run's training (``epochs``, ``steps``), evolution and test all ran; with
    the best checkpoint and its test scores."""
    record = {"epochs": epochs, "steps": steps, "best_checkpoint": best, "test": test}
    write_text(folder / FINISHED, json.dumps(record, indent=2) + "\n")


def finished(ckpt_path: str, epochs: int, steps: int) -> bool:
    """Whether the run of the checkpoint at ``ckpt_path`` (``<run folder>/checkpoints/<name>.ckpt``) finished at the
    checkpoint's ``epochs`` and ``steps``: its ``finished.json`` says so."""
    path = Path(ckpt_path).parent.parent / FINISHED
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none (the run did not finish), or unreadable: the resume runs what was left
        return False
    return isinstance(record, dict) and (record.get("epochs"), record.get("steps")) == (epochs, steps)


def signal_name(exception: BaseException | None) -> str | None:
    """``"SIGTERM"`` / ``"SIGINT"`` when ``exception`` is how Lightning ends a run on that signal, else None.

    Lightning raises ``SIGTERMException`` (a ``SystemExit`` without a code, so a bare exit 0) for SIGTERM; for
    Ctrl-C it catches the ``KeyboardInterrupt`` and calls ``sys.exit(1)`` from inside that handler.
    """
    if isinstance(exception, SIGTERMException):
        return "SIGTERM"
    if isinstance(exception, KeyboardInterrupt):
        return "SIGINT"
    if isinstance(exception, SystemExit) and exception.__context__ is not None:
        return signal_name(exception.__context__)
    return None


class RunConfig(SaveConfigCallback):
    """LightningCLI's config saving, into the run's own folder (beside ``checkpoints/``), once per run.

    LightningCLI saves to ``trainer.log_dir``, which for W&B is the shared ``save_dir``: every run there wrote (and
    overwrote) one ``runs/config.yaml``. A resumed run whose config differs from the saved one (``max_epochs``
    raised, say) adds ``config-resumed-epoch=N.yaml`` instead of replacing it.
    """

    def __init__(self, parser: LightningArgumentParser, config: Namespace, **kwargs: Any):
        kwargs["save_to_log_dir"] = False
        super().__init__(parser, config, **kwargs)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Nothing at ``setup``: the run folder is known once the checkpoint callbacks have set up."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        folder = run_folder(trainer) or Path(trainer.log_dir or trainer.default_root_dir)
        text = self.parser.dump(self.config, skip_none=False)
        path = folder / "config.yaml"
        if path.is_file() and path.read_text(encoding="utf-8") != text:
            path = folder / f"config-resumed-epoch={trainer.current_epoch}.yaml"
        try:
            write_text(path, text)
        except OSError as error:
            rank_zero_warn(f"could not save the run's config: {error}", category=CubcamWarning)


def exit_status(error: BaseException) -> int | None:
    """The process's exit status for a run that ``error`` ended on a signal (130, 143), else None."""
    signal = signal_name(error)
    return SIGNAL_EXIT[signal] if signal is not None else None
