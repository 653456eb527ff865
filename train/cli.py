"""``cubcam``: LightningCLI for training (fit/validate/test/predict) plus the ``explain`` and ``evaluate`` tools.

    cubcam fit --config configs/demo/classifier.yaml
    cubcam fit --config configs/embedding.yaml --config configs/trainer/ddp.yaml
    cubcam fit --config configs/demo/classifier.yaml --ckpt_path runs/cubcam/<run>/checkpoints/last.ckpt  # resume
    cubcam explain ... / cubcam evaluate ...   (see ``cubcam explain --help``)
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from jsonargparse import Namespace
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info

from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.modules import Classifier, CUBModule, EmbeddingNet  # noqa: F401  (short names for --model)

TOOLS = ("explain", "evaluate")  # subcommands that are not Lightning's; dispatched to cubcam.train.<name>.main


class CubCamCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The dataset decides the head size and the caption names; the model config never repeats them.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """``fit --ckpt_path <save_dir>/<project>/<run id>/checkpoints/last.ckpt`` continues that W&B run (and so
        writes to that checkpoint folder) unless a run id is given: resuming should not scatter one training."""
        config = self.config.get(self.subcommand) if self.subcommand == "fit" else None
        if config is None or not config.get("ckpt_path"):
            return
        logger = config.trainer.logger
        if not isinstance(logger, Namespace) or not str(logger.class_path).endswith("WandbLogger"):
            return
        ckpt = Path(config.ckpt_path)
        if logger.init_args.get("id") is None and ckpt.parent.name == "checkpoints" \
                and ckpt.parent.parent.parent.name == logger.init_args.get("project"):
            logger.init_args.id = ckpt.parent.parent.name

    def after_fit(self) -> None:
        """Say where the results are: a user of the demo should not have to search for them."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        for ckpt in trainer.checkpoint_callbacks:
            if ckpt.monitor is None:
                rank_zero_info(f"checkpoint: latest {ckpt.best_model_path or '-'}")
            else:
                score = float(ckpt.best_model_score) if ckpt.best_model_score is not None else "-"
                rank_zero_info(f"checkpoint: best {ckpt.best_model_path or '-'} ({ckpt.monitor}={score})")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run_dir = Path(logger.experiment.dir).parent  # <save_dir>/wandb/offline-run-<time>-<id>
                rank_zero_info(f"W&B run: {run_dir}   upload with: wandb sync {run_dir}")
                logger.experiment.finish()  # flush the run now; a later fit in this process starts a new one


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``cubcam`` and ``python -m cubcam.train``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in TOOLS:
        importlib.import_module(f"cubcam.train.{args[0]}").main(args[1:])  # imported lazily: training never needs them
        return
    CubCamCLI(CUBModule, CUBDataModule, subclass_mode_model=True, save_config_kwargs={"overwrite": True},
              args=argv)  # None: LightningCLI reads sys.argv itself
