"""Logging sinks: where a rendered :class:`~cubcam.callbacks.panel_render.Panel` goes, one small class each.

Lightning removed ``log_image`` from its base logger, so each logger is spoken to in its own API. A sink gets the
panel, its epoch and the step of that epoch's ``val/*`` metrics, so panels and metrics line up on any step axis.
A failing sink is the callback's business (it warns and goes on); a sink itself may raise.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Protocol

import pytorch_lightning as pl

from cubcam.callbacks.panel_render import Panel, wandb_boxes
from cubcam.cams.figure import save_png

PANEL_KEY = "val/cam_panel"
PANEL_COLUMNS = 4  # strips per row of the PNG grid


class PanelSink(Protocol):
    """One destination of the panel."""

    name: str  # for warnings: what failed

    def log_panel(self, panel: Panel, step: int) -> None: ...


class WandbSink:
    """One ``wandb.Image`` per strip under ``val/cam_panel``, with the GT and CAM boxes as W&B box groups, in a row
    that also carries ``epoch`` at the epoch's step.

    Each strip goes to W&B as a PNG written here at compression level 1: W&B encodes arrays at Pillow's default
    level 6, several times slower, a large share of the callback's time (README, Benchmarks). W&B copies the
    files while logging, so they can go with their temporary folder; only where the run may symlink media (the
    ``allow_media_symlink`` setting) does W&B get the arrays.
    """

    def __init__(self, logger: Any):
        self.logger = logger
        self.name = type(logger).__name__

    def log_panel(self, panel: Panel, step: int) -> None:
        import wandb

        def log(sources: list[Any]) -> None:
            images = [
                wandb.Image(source, caption=caption, boxes=wandb_boxes(strip, panel.class_names))
                for source, strip, caption in zip(sources, panel.strips, panel.captions)
            ]
            self.logger.log_metrics({PANEL_KEY: images, "epoch": panel.epoch}, step=step)

        if getattr(self.logger.experiment.settings, "allow_media_symlink", False):
            log([strip.pixels for strip in panel.strips])
            return
        with tempfile.TemporaryDirectory(prefix="cubcam-panel-") as folder:
            log([str(save_png(strip.pixels, Path(folder) / f"{k:02d}.png")) for k, strip in enumerate(panel.strips)])


class PngSink:
    """The PNG grid, ``<run dir>/cam_panels/epoch_NNN.png``, with any logger or none."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.name = f"the PNG grid in {folder}"

    def log_panel(self, panel: Panel, step: int) -> None:
        save_png(panel.grid(PANEL_COLUMNS), self.folder / f"epoch_{panel.epoch:03d}.png")


def sinks_for(trainer: pl.Trainer) -> list[PanelSink]:
    """A sink per logger that can show images, and the PNG grid."""
    sinks: list[PanelSink] = [
        WandbSink(logger) for logger in trainer.loggers if "wandb" in type(logger).__name__.lower()
    ]
    return [*sinks, PngSink(run_dir(trainer) / "cam_panels")]


def run_dir(trainer: pl.Trainer) -> Path:
    """Where Lightning's ModelCheckpoint puts ``checkpoints/`` by default, minus that last part."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version


def metrics_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs this epoch's ``val/*`` metrics at (one below ``global_step`` during in-fit
    validation; not ``global_step - 1``, which gradient accumulation breaks)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
