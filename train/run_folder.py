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
"""

from __future__ import annotations

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
        epoch_loop = trainer.fit_loop.epoch_loop
        mid_epoch = epoch_loop.batch_progress.current.completed > 0
        config = path.parent.parent / "config.yaml"
        command = f"cubcam fit --config {config}" if config.is_file() else "cubcam fit <the same arguments>"
        rank_zero_info(
            f"{signal}: saved {path} at epoch {trainer.current_epoch}, step {trainer.global_step}"
            + (
                " (mid-epoch: Lightning warns on resuming it, and the resumed run is not bit-identical)"
                if mid_epoch
                else ""
            )
            + f"\nresume with: {command} --ckpt_path {path}"
        )


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
        checkpoint = trainer.checkpoint_callback
        dirpath = getattr(checkpoint, "dirpath", None)
        folder = Path(dirpath).parent if dirpath else Path(trainer.log_dir or trainer.default_root_dir)
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
