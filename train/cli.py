"""``cubcam``: LightningCLI for training (fit/validate/test/predict) plus the ``explain`` and ``evaluate`` tools.

cubcam fit --config configs/demo/classifier.yaml
cubcam fit --config configs/embedding.yaml --config configs/trainer/ddp.yaml
cubcam fit --config configs/demo/classifier.yaml --ckpt_path runs/cubcam/<run>/checkpoints/last.ckpt  # resume
cubcam fit --config configs/demo/classifier.yaml --model.init_args.arch resnet34
cubcam fit --config configs/demo/classifier.yaml --model.init_args.arch convnext_atto   # any timm model
cubcam explain ... / cubcam evaluate ...   (see ``cubcam explain --help``)
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from jsonargparse import DefaultHelpFormatter, Namespace
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from cubcam import CubcamWarning
from cubcam.cams.files import WriteFailed
from cubcam.train.data.cub import BadImage, DatasetNotFound
from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.inspection.checkpoint import CheckpointError, read_checkpoint
from cubcam.train.modules import Classifier, CUBModule, EmbeddingNet  # noqa: F401  (short names for --model)
from cubcam.train.packaged import missing_config, packaged_configs
from cubcam.train.run_folder import (
    RunConfig,
    epochs_trained,
    exit_status,
    finished,
    run_folder,
    training_limit,
    write_finished,
)

TOOLS = {  # subcommands that are not Lightning's: (module, function, help); imported only when called
    "explain": (
        "cubcam.train.inspection.explain",
        "main",
        "what a checkpoint looks at: your images, a dataset panel, a retrieval (cubcam explain --help)",
    ),
    "evaluate": (
        "cubcam.train.inspection.evaluate",
        "main",
        "localization scores of a checkpoint's maps over a split (cubcam evaluate --help)",
    ),
    "compare": (
        "cubcam.train.inspection.compare",
        "main",
        "two checkpoints side by side: scores, classes, the maps that changed (cubcam compare --help)",
    ),
    "demo": ("cubcam.train.demo", "main", "both demo models on synthetic CUB-format data, W&B offline"),
    "configs": ("cubcam.train.demo", "configs_main", "copy the packaged configs to a folder, to edit"),
}
EPILOG = "more commands:\n" + "\n".join(f"  cubcam {name:<9} {text}" for name, (_, _, text) in TOOLS.items())


class _HelpWithTools(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the epilog (the tools) printed as written."""


class CubCamCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The dataset decides the head size and the caption names; the model config never repeats them.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")
        # A ViT's patch grid is fixed when it is built: the model is built for the size the data is served at.
        parser.link_arguments("data.image_size", "model.init_args.image_size")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Lightning's, without its warning about ``args`` given beside ``sys.argv`` (cubcam's ``args`` are the
        command line itself: ``sys.argv[1:]``, packaged config names resolved by :func:`packaged_configs`), then
        :meth:`resume_config`."""
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
        self.resume_config()

    def resume_config(self) -> None:
        """A resumed checkpoint's hyper-parameters become the model config, as Lightning does after parsing (its
        merge of the same values then changes nothing), but checked first: one line for a file that is no
        readable Lightning checkpoint, an error naming both models where the config asks for another
        (:func:`check_resume`), and the run's progress kept for :meth:`fit`.

        Raises:
            CheckpointError: a file that is no readable Lightning checkpoint, or one of another model.
        """
        self.resumed_progress: tuple[int, int] | None = None
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry") or ":" in str(ckpt_path).split("/")[0]:
            return  # Lightning's own names for checkpoints it finds itself, and remote ones (s3://, registry:)
        checkpoint = read_checkpoint(ckpt_path)
        if "pytorch-lightning_version" not in checkpoint:
            raise CheckpointError(f"{ckpt_path} is a state_dict, not a Lightning checkpoint: it cannot resume a run")
        loops = checkpoint.get("loops") or {}
        self.resumed_progress = epochs_trained(loops.get("fit_loop", {})), int(checkpoint.get("global_step", 0))
        hparams: dict[str, Any] = dict(checkpoint.get("hyper_parameters", {}))
        del checkpoint  # the memory map
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        check_resume(ckpt_path, self.config[self.config.subcommand].get("model"), hparams)
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"error: the hyper-parameters saved in {ckpt_path} do not parse as a cubcam model\n")
            raise

    def before_instantiate_classes(self) -> None:
        """Resuming should not scatter one training: ``fit --ckpt_path <run folder>/checkpoints/last.ckpt`` continues
        that run's W&B run (``<save_dir>/<project>/<run id>/``) or TensorBoard version (``<save_dir>/<name>/
        version_N/``) unless one is given. A W&B run without a name is named after its model, e.g.
        ``classifier-resnet18``, so that an ``--model.init_args.arch`` override shows in the runs table."""
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is not None and self.subcommand == "fit":
            check_writable(run_folders(config.trainer))
        logger = config.trainer.logger if config is not None else None
        if config is None or not isinstance(logger, Namespace):
            return
        kind = str(logger.class_path).rsplit(".", 1)[-1]
        if kind == "WandbLogger" and logger.init_args.get("name") is None:
            model = config.model
            logger.init_args.name = f"{str(model.class_path).rsplit('.', 1)[-1].lower()}-{model.init_args.get('arch')}"
        if self.subcommand != "fit" or not config.get("ckpt_path"):
            return
        run = Path(config.ckpt_path).parent.parent  # <save_dir>/<project or name>/<run id or version_N>
        if Path(config.ckpt_path).parent.name != "checkpoints":
            return
        if (
            kind == "WandbLogger"
            and logger.init_args.get("id") is None
            and run.parent.name == logger.init_args.get("project")
        ):
            logger.init_args.id = run.name
        if (
            kind == "TensorBoardLogger"
            and logger.init_args.get("version") is None
            and run.parent.name == logger.init_args.get("name")
            and run.name.startswith("version_")
        ):
            logger.init_args.version = run.name

    def fit(self, model: pl.LightningModule, **kwargs: Any) -> None:
        """``trainer.fit``, unless the checkpoint it resumes is of a run that finished (its training, evolution and
        test: ``finished.json``): then say so and do nothing, as a second fit would re-test it and log its evolution
        again. A checkpoint whose training is done but whose run is not (a signal in the last validation, the
        evolution or the test) resumes to what the run had left: Lightning skips the training, CAMPanel logs the
        evolution and :meth:`after_fit` tests."""
        self.finished = False
        trainer = self.trainer
        ckpt_path = kwargs.get("ckpt_path")
        if self.resumed_progress is not None:
            epochs, steps = self.resumed_progress
            limit = training_limit(epochs, steps, trainer.max_epochs, trainer.max_steps)
            if limit is not None and finished(str(ckpt_path), epochs, steps):
                rank_zero_info(
                    f"{ckpt_path} has finished its run ({epochs} epochs, {steps} steps; {limit}): "
                    f"nothing to train. Raise --trainer.max_epochs to continue it."
                )
                self.finished = True
                return
            if limit is not None:
                rank_zero_info(
                    f"{ckpt_path} finished training ({epochs} epochs, {steps} steps; {limit}) but not its run: "
                    "running what it had left, the CAM evolution and the test of the best checkpoint"
                )
        trainer.fit(model, **kwargs)

    def after_fit(self) -> None:
        """Score the best checkpoint once on the test split (``test/*``, into the same logger run), record that the
        run finished (``finished.json`` in its folder), then say where the results are: a user of the demo should
        not have to search for them."""
        trainer = self.trainer
        if self.finished:
            return
        self.best_checkpoint = best_checkpoint(trainer)  # what `cubcam demo` points the tools at
        # Read before testing: trainer.test restores the best checkpoint's callback states, older than these.
        summary = []
        for ckpt in _model_checkpoints(trainer):
            if ckpt.monitor is None:
                summary.append(f"checkpoint: latest {ckpt.last_model_path or ckpt.best_model_path or '-'}")
            else:
                score = float(ckpt.best_model_score) if ckpt.best_model_score is not None else "-"
                summary.append(f"checkpoint: best {ckpt.best_model_path or '-'} ({ckpt.monitor}={score})")
        epochs, steps = epochs_trained(trainer.fit_loop.state_dict()), trainer.global_step
        folder = run_folder(trainer)
        if not trainer.interrupted:
            scores = self.test_best()
            if folder is not None and trainer.is_global_zero:
                try:
                    write_finished(folder, epochs, steps, self.best_checkpoint, scores)
                except WriteFailed as error:  # a resume would test again: nothing is lost
                    rank_zero_warn(f"could not record that the run finished: {error}", category=CubcamWarning)
        if not trainer.is_global_zero:
            return
        for line in summary:
            rank_zero_info(line)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                rank_zero_info(
                    f"TensorBoard: {logger.log_dir}   view with: tensorboard --logdir {logger.save_dir} "
                    f"--samples_per_plugin images={trainer.current_epoch + 2}"  # its UI keeps 10 images per tag
                )
            if isinstance(logger, MLFlowLogger):
                uri = logger.experiment.tracking_uri
                rank_zero_info(f"MLflow: run {logger.run_id} in {uri}   view with: mlflow ui --backend-store-uri {uri}")
            if isinstance(logger, WandbLogger):
                run_dir = Path(logger.experiment.dir).parent  # <save_dir>/wandb/offline-run-<time>-<id>
                rank_zero_info(f"W&B run: {run_dir}   upload with: wandb sync {run_dir}")
                logger.experiment.finish()  # flush the run now; a later fit in this process starts a new one

    def test_best(self) -> dict[str, float]:
        """``trainer.test`` on the test split with the best checkpoint (chosen on the validation split), or with the
        final weights when no checkpoint was kept by a score; on every rank, as Lightning needs. Returns the test
        scores."""
        trainer = self.trainer
        best = best_checkpoint(trainer)
        rank_zero_info(f"testing {'the best checkpoint ' + best if best else 'the final weights'} on the test split")
        results = trainer.test(
            self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=trainer.is_global_zero
        )
        return {name: float(value) for result in results for name, value in result.items()}


def run_folders(trainer: Namespace) -> dict[Path, str]:
    """The local folders a run writes to, each with the option that moves it: the loggers' ``save_dir`` (and W&B's
    ``wandb/`` in it), or ``default_root_dir`` without a logger. MLflow's tracking URI is MLflow's to check."""
    loggers = trainer.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    folders: dict[Path, str] = {}
    for logger in loggers:
        if not isinstance(logger, Namespace):
            continue
        kind = str(logger.get("class_path", "")).rsplit(".", 1)[-1]
        save_dir = logger.get("init_args", Namespace()).get("save_dir")
        if kind == "MLFlowLogger" or (save_dir is not None and "://" in str(save_dir)):
            continue
        option = "--trainer.logger.init_args.save_dir"
        folders[Path(save_dir or ".")] = option
        if kind == "WandbLogger":
            folders[Path(save_dir or ".") / "wandb"] = option
    if not folders:
        folders[Path(trainer.get("default_root_dir") or ".")] = "--trainer.default_root_dir"
    return folders


def check_writable(folders: dict[Path, str]) -> None:
    """Each folder (created if missing) takes a new file, tried before any model is built: a read-only folder was a
    60-line traceback from inside ``wandb.init``, or a failed checkpoint save after a whole epoch.

    Raises:
        WriteFailed: a folder that cannot be created or written, named with the option that moves it.
    """
    for folder, option in folders.items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise WriteFailed(
                error.errno,
                f"cannot write to {folder} ({error.strerror}): make it writable, or pass {option} <a writable folder>",
            ) from error


def best_checkpoint(trainer: pl.Trainer) -> str:
    """The path of the best checkpoint by a score, or "" when no checkpoint callback keeps one."""
    return next((c.best_model_path for c in _model_checkpoints(trainer) if c.monitor and c.best_model_path), "")


def _model_checkpoints(trainer: pl.Trainer) -> list[ModelCheckpoint]:
    """The trainer's ModelCheckpoints (``checkpoint_callbacks`` is typed as any ``Checkpoint``)."""
    return [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]


def check_resume(ckpt_path: str, configured: Namespace | None, saved: dict[str, Any]) -> None:
    """A resumed run is the checkpoint's model, so the config must agree with it: another class or architecture is
    an error naming both; other model settings the config gives differently (``--model.init_args.lr 0.1``) cannot
    be honoured and are listed in one warning.

    Raises:
        CheckpointError: the checkpoint holds another model class or architecture than the config's.
    """
    if not isinstance(configured, Namespace):
        return
    saved_class = str(saved.get("_class_path", "")).rsplit(".", 1)[-1]
    wanted_class = str(configured.get("class_path", "")).rsplit(".", 1)[-1]
    wanted = configured.get("init_args") or Namespace()
    if (saved_class and wanted_class and saved_class != wanted_class) or saved.get("arch") != wanted.get("arch"):
        raise CheckpointError(
            f"{ckpt_path} is a checkpoint of {saved_class or 'a model'} ({saved.get('arch')}), but the config asks "
            f"for {wanted_class or 'a model'} ({wanted.get('arch')}): resume it with the config it was trained with"
        )
    ignored = [
        f"{key}={wanted[key]!r} (kept: {saved[key]!r})"
        for key in sorted(set(saved) & set(vars(wanted)))
        if not key.startswith("_") and key not in LINKED and _plain(wanted[key]) and wanted[key] != saved[key]
    ]
    if ignored:
        rank_zero_warn(
            f"resuming {ckpt_path} keeps the model settings it was trained with; these config values are ignored: "
            + ", ".join(ignored),
            category=CubcamWarning,
        )


LINKED = ("num_classes", "class_names")  # set from the data at instantiation, not by the user's config


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, tuple))


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``cubcam`` and ``python -m cubcam.train`` (a console script exits with what it returns:
    nothing, here); see :func:`run`."""
    run(argv)


def run(argv: list[str] | None = None) -> CubCamCLI | None:
    """The command line ``argv`` (default: ``sys.argv[1:]``); returns the CLI of a Lightning subcommand.

    A run ended by SIGTERM or Ctrl-C exits with 143 / 130 (Lightning ends them with a bare ``SystemExit``, status 0,
    and ``sys.exit(1)``); a checkpoint that cannot resume, or a write that failed (a full disk), is one line and
    status 1, the partial file never left under its name.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in TOOLS:
        module, function, _ = TOOLS[args[0]]
        try:
            getattr(importlib.import_module(module), function)(args[1:])
        except KeyboardInterrupt:  # Ctrl-C in a tool: its writes are atomic (and explain writes what it has)
            print(f"interrupted: cubcam {args[0]} stopped; every file it wrote is whole", file=sys.stderr)
            sys.exit(130)
        return None
    args = packaged_configs(args)  # --config demo/classifier.yaml: the packaged file, where none is here
    missing = missing_config(args)
    if missing is not None:  # jsonargparse's own answer is its whole usage, the cause on the last of 60 lines
        sys.exit(missing)
    try:
        return CubCamCLI(
            CUBModule,
            CUBDataModule,
            subclass_mode_model=True,
            save_config_callback=RunConfig,
            parser_kwargs={"epilog": EPILOG, "formatter_class": _HelpWithTools},
            args=args,
        )
    except (SystemExit, KeyboardInterrupt) as error:
        status = exit_status(error)
        if status is None:
            raise
        sys.exit(status)
    except (CheckpointError, WriteFailed, DatasetNotFound, BadImage) as error:
        sys.exit(f"error: {user_message(error)}")


def user_message(error: BaseException) -> str:
    """The message of an error that is a user's to fix; one re-raised from a DataLoader worker carries the worker's
    whole traceback (``Caught BadImage in DataLoader worker process 0. Original Traceback ...``): its own message
    is the part after the last ``BadImage: ``."""
    text = str(error)
    marker = f"{type(error).__name__}: "
    return text.rstrip().rsplit(marker, 1)[-1] if text.startswith("Caught ") and marker in text else text
