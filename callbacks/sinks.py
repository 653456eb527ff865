"""Logging sinks: where a rendered :class:`~cubcam.callbacks.panel_data.Panel` goes, one small class each: W&B,
TensorBoard, MLflow and the PNG files (a further logger, Neptune or Comet, is one more class with these two
methods), each through its library's public API.

A sink gets the panel, its epoch and the step of that epoch's ``val/*`` metrics, so panels and metrics line up on
any step axis. Its ``stage_*`` methods run on the picture thread (``picture_thread.py``): drawing, encoding and
whatever its logger allows off the loop's thread. The :data:`Commit` they return runs on the loop's thread (W&B's
log call: wandb's ``run.log`` is not thread-safe, wandb #1824). A sink may raise; the callback warns and goes on.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytorch_lightning as pl
from PIL import Image
from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

from cubcam.callbacks.evolution import Figures, save_gif
from cubcam.callbacks.panel_data import Panel, name
from cubcam.cams.figure import Strip, grid, save_png
from cubcam.cams.files import write_bytes
from cubcam.namespaces import in_both

# The loggers a sink below shows images in, of either Lightning namespace.
WANDB_LOGGERS, TENSORBOARD_LOGGERS, MLFLOW_LOGGERS = (
    in_both(c) for c in (WandbLogger, TensorBoardLogger, MLFlowLogger)
)
SERVED_LOGGERS = WANDB_LOGGERS + TENSORBOARD_LOGGERS + MLFLOW_LOGGERS
PANEL_KEY = "val/cam_panel"
TABLE_KEY = "val/cam_table"
EVOLUTION_KEY = "val/cam_evolution"
EVOLUTION_GIF_KEY = "val/cam_evolution_gif"
TABLE_COLUMNS = [
    "index", "true", "predicted", "score", "cam_box_iou", "heatmap_ratio", "peak_in_box", "finer_heatmap_ratio",
    "finer_peak_in_box", "epoch",
]  # fmt: skip
TENSORBOARD_SIDE = 480  # px: TensorBoard's grid is downscaled to this longest side (its writer checksums in Python)
JPEG_QUALITY = 90  # of the grid W&B gets


Commit = Callable[[], None]  # a sink's last part of logging, on the loop's thread


def committed() -> None:
    """The commit of a sink that logged all of it while staging."""


class PanelSink(Protocol):
    """One destination of the panel: every panel epoch, and the evolution once at the end of ``fit``."""

    name: str  # for warnings: what failed

    def stage_panel(self, panel: Panel, step: int) -> Commit: ...

    def stage_evolution(self, evolution: Figures, step: int) -> Commit: ...


class WandbSink:
    """W&B: the panel as one ``wandb.Image`` of the grid under ``val/cam_panel`` with every bird's GT and CAM boxes
    as two box groups (``ground_truth``, ``cam``: the UI toggles them), and a ``wandb.Table`` under ``val/cam_table``
    (a row of numbers per bird, sortable: the worst-localized birds first), in one row that also carries ``epoch``,
    at the epoch's step; the evolution as an image list and an animated GIF at the end.

    One grid image is the cheap public form: W&B copies one file and two box files on the loop's thread (a list of
    16 images with box groups cost it about 25 times as long). The table is one across epochs (column ``epoch``):
    ``wandb.Table(log_mode="INCREMENTAL")`` gets each epoch's rows and uploads only those; offline each increment
    is a file of its epoch's rows. The grid goes to W&B as a JPEG file (quality 90) encoded on the picture thread
    (a PNG of photos took six times as long; W&B encodes arrays as PNG at Pillow's default level 6, slower still),
    removed once logged; only a run that may symlink media (``allow_media_symlink``) gets the array. The CAM
    scores are defined with ``summary="max"``, on W&B's step axis ``trainer/global_step`` as WandbLogger defines
    ``*``.
    """

    def __init__(self, logger: Any, metric_keys: list[str]):
        self.logger = logger
        self.name = type(logger).__name__
        self._table: Any = None  # the incremental table, made with the first panel
        for key in metric_keys:
            logger.experiment.define_metric(key, summary="max", step_metric="trainer/global_step")
        self._symlinks = bool(getattr(logger.experiment.settings, "allow_media_symlink", False))

    def stage_panel(self, panel: Panel, step: int) -> Commit:
        """The grid's JPEG and its ``wandb.Image`` with the box groups; the commit logs it with the table rows."""
        import wandb

        boxes = wandb_boxes(panel.strips, panel.origins, panel.class_names)
        caption = f"epoch {panel.epoch}: " + " ".join(f"#{index}" for index in panel.indices)
        folder, source = self._source(panel.plain_grid, "panel.jpg")
        image = wandb.Image(source, caption=caption, boxes=boxes)
        rows = [
            [
                r["index"],
                r["true"],
                r["predicted"],
                r["score"],
                r["cam_box_iou"],
                r["heatmap_ratio"],
                r["peak_in_box"],
                r["finer_heatmap_ratio"],
                r["finer_peak_in_box"],
                e,
            ]
            for r, e in zip(panel.rows, [panel.epoch] * len(panel.rows))
        ]

        def commit() -> None:
            try:
                table = self._rows(rows)
                self.logger.log_metrics({PANEL_KEY: image, TABLE_KEY: table, "epoch": panel.epoch}, step=step)
            finally:
                if folder is not None:
                    folder.cleanup()  # W&B copied the file into the run

        return commit

    def _source(self, pixels: np.ndarray, file_name: str) -> tuple[tempfile.TemporaryDirectory[str] | None, Any]:
        """(a temporary folder to remove once logged, what ``wandb.Image`` gets: a JPEG file in it, or the array)."""
        if self._symlinks:  # a symlink into the removed folder would dangle
            return None, pixels
        folder = tempfile.TemporaryDirectory(prefix="cubcam-panel-")
        path = Path(folder.name) / file_name
        Image.fromarray(pixels).save(path, quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: crisp captions; no fsync
        return folder, str(path)

    def _rows(self, rows: list[list[Any]]) -> Any:
        """The run's one incremental table with ``rows`` added (on the loop's thread: the table is shared)."""
        import wandb

        if self._table is None:
            self._table = wandb.Table(columns=list[str | int](TABLE_COLUMNS), log_mode="INCREMENTAL")
        for row in rows:
            self._table.add_data(*row)
        return self._table

    def stage_evolution(self, evolution: Figures, step: int) -> Commit:
        import wandb

        folder = tempfile.TemporaryDirectory(prefix="cubcam-evolution-")
        strips = [
            save_png(strip, Path(folder.name) / f"{i}.png") for i, strip in zip(evolution.indices, evolution.strips)
        ]
        gif = Path(folder.name) / "evolution.gif"
        save_gif(evolution.frames, gif)
        images = [wandb.Image(str(path), caption=f"#{i}") for path, i in zip(strips, evolution.indices)]
        row = {EVOLUTION_KEY: images, EVOLUTION_GIF_KEY: wandb.Image(str(gif))}

        def commit() -> None:
            try:
                self.logger.log_metrics(row, step=step)
            finally:
                folder.cleanup()

        return commit


class TensorBoardSink:
    """TensorBoard: the PNG grid, downscaled to ``TENSORBOARD_SIDE`` px, as an image per panel epoch (tag
    ``val/cam_panel``, at the epoch's step; the CAM scores are scalars Lightning logs itself) and the evolution at
    the end (``val/cam_evolution``: every bird's strip of thumbnails, one under the other), through
    ``SummaryWriter.add_image``, whose event writer is thread-safe. Downscaled because TensorBoard without
    TensorFlow checksums each record in pure Python in its writer thread: its time grows with the image."""

    def __init__(self, logger: Any):
        self.logger = logger
        self.name = type(logger).__name__

    def stage_panel(self, panel: Panel, step: int) -> Commit:
        self.logger.experiment.add_image(PANEL_KEY, downscaled(panel.grid), step, dataformats="HWC")
        return committed

    def stage_evolution(self, evolution: Figures, step: int) -> Commit:
        image = grid(evolution.strips, ncols=1)  # each strip names its bird (on the strip, not below it)
        self.logger.experiment.add_image(EVOLUTION_KEY, downscaled(image), step, dataformats="HWC")
        self.logger.experiment.flush()
        return committed


def downscaled(image: np.ndarray, side: int = TENSORBOARD_SIDE) -> np.ndarray:
    """``image`` shrunk so that its longer side is at most ``side`` px."""
    height, width = image.shape[:2]
    scale = side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


class MlflowSink:
    """MLflow: the PNG grid per panel epoch as an image under ``val/cam_panel`` at the epoch's step
    (``MlflowClient.log_image(run_id, image, key=, step=)``; the run page's image view steps through them), the bird
    table per epoch as ``cam_table/epoch_NNN.json`` (``log_table`` has no step: an artifact per epoch; the
    ``overlay`` column is left out, as the grid holds the pictures) and the evolution at the end under
    ``cam_evolution/`` (every bird's strip, and the GIF). Through ``MLFlowLogger.experiment`` (an ``MlflowClient``)
    and its ``run_id``; the CAM scores are metrics Lightning logs itself."""

    def __init__(self, logger: Any):
        self.client, self.run_id = logger.experiment, logger.run_id
        self.name = type(logger).__name__

    def stage_panel(self, panel: Panel, step: int) -> Commit:
        """All of it: each client call is a request of its own to the tracking server (or store)."""
        self.client.log_image(self.run_id, panel.grid, key=PANEL_KEY, step=step)
        columns = [c for c in TABLE_COLUMNS if c != "overlay"]
        rows = [{**row, "epoch": panel.epoch} for row in panel.rows]
        table = {column: [row[column] for row in rows] for column in columns}
        self.client.log_table(self.run_id, data=table, artifact_file=f"cam_table/epoch_{panel.epoch:03d}.json")
        return committed

    def stage_evolution(self, evolution: Figures, step: int) -> Commit:
        for index, strip in zip(evolution.indices, evolution.strips):
            self.client.log_image(self.run_id, strip, artifact_file=f"cam_evolution/evolution_{index}.png")
        with tempfile.TemporaryDirectory(prefix="cubcam-evolution-") as folder:
            path = Path(folder) / "evolution.gif"
            save_gif(evolution.frames, path)
            self.client.log_artifact(self.run_id, str(path), "cam_evolution")
        return committed


class PngSink:
    """Files beside the checkpoints, with any logger or none: ``cam_panels/epoch_NNN.png`` every panel epoch, and
    at the end ``cam_panels/evolution_<dataset index>.png`` per bird and ``cam_panels/evolution.gif``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.name = f"the PNG grid in {folder}"

    def stage_panel(self, panel: Panel, step: int) -> Commit:
        write_bytes(self.folder / f"epoch_{panel.epoch:03d}.png", panel.grid_png)
        return committed

    def stage_evolution(self, evolution: Figures, step: int) -> Commit:
        for index, strip in zip(evolution.indices, evolution.strips):
            save_png(strip, self.folder / f"evolution_{index}.png")
        save_gif(evolution.frames, self.folder / "evolution.gif")
        return committed


def sink_factories(trainer: pl.Trainer, metric_keys: list[str]) -> list[tuple[str, Callable[[], PanelSink]]]:
    """(name, maker) of a sink per logger that can show images (W&B, TensorBoard, of either Lightning namespace;
    several at once) and of the PNG files; the caller makes them, so that one logger that fails to set up costs only
    its own sink."""
    makers: list[tuple[str, Callable[[], PanelSink]]] = []
    for logger in trainer.loggers:
        if isinstance(logger, WANDB_LOGGERS):
            makers.append((type(logger).__name__, partial(WandbSink, logger, metric_keys)))
        elif isinstance(logger, TENSORBOARD_LOGGERS):
            makers.append((type(logger).__name__, partial(TensorBoardSink, logger)))
        elif isinstance(logger, MLFLOW_LOGGERS):
            makers.append((type(logger).__name__, partial(MlflowSink, logger)))
    if getattr(trainer, "fast_dev_run", False):  # a dry run writes no files (no logger, no checkpoints): no PNGs
        return makers
    folder = png_folder(trainer)  # first: the grid it composes serves TensorBoard as well
    return [(f"the PNG files in {folder}", partial(PngSink, folder)), *makers]


def make_sinks(trainer: pl.Trainer, metric_keys: list[str], warn: Callable[[str], None]) -> list[PanelSink]:
    """A sink per logger that can show images and the PNG files (:func:`sink_factories`); a logger whose sink cannot
    be made is left out with a warning."""
    sinks = []
    for what, make in sink_factories(trainer, metric_keys):
        try:
            sinks.append(make())
        except Exception as err:  # one logger's failure costs only its own sink
            warn(f"cannot log the panel to {what}: {type(err).__name__}: {err}")
    return sinks


def unserved_loggers(trainer: pl.Trainer) -> list[str]:
    """The class names of the trainer's loggers that no sink can show images in (CSVLogger, Neptune, Comet, ...);
    none in a ``fast_dev_run``, whose stand-in logger logs nothing and which writes no files."""
    if getattr(trainer, "fast_dev_run", False):
        return []
    return [type(logger).__name__ for logger in trainer.loggers if not isinstance(logger, SERVED_LOGGERS)]


def png_folder(trainer: pl.Trainer) -> Path:
    """Where the PNG files go: ``cam_panels/`` beside the checkpoints."""
    return run_dir(trainer) / "cam_panels"


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
    # Private: Lightning has no public name for it; its own LearningRateMonitor and loggers read this attribute.
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def wandb_boxes(strips: list[Strip], origins: list[tuple[int, int]], class_names: list[str]) -> dict[str, Any]:
    """W&B's box groups over the grid: ``ground_truth`` (green in the PNG) and ``cam`` (red), every strip's boxes
    moved to its ``origin`` in the grid, each with the ``class_labels``; both groups are always present (possibly
    empty), so the UI toggles stay put."""
    groups = {}
    for group in ("ground_truth", "cam"):
        data, classes = [], [len(class_names)]
        for strip, (left, top) in zip(strips, origins):
            for (x, y, w, h), c in strip.gt_boxes if group == "ground_truth" else strip.cam_boxes:
                position = {"minX": left + x, "maxX": left + x + w, "minY": top + y, "maxY": top + y + h}
                data.append(
                    {
                        "position": {key: round(float(value)) for key, value in position.items()},
                        "domain": "pixel",
                        "class_id": int(c),
                        "box_caption": f"{group}: {name(class_names, int(c))}",
                    }
                )
                classes.append(int(c) + 1)
        groups[group] = {"box_data": data, "class_labels": {c: name(class_names, c) for c in range(max(classes))}}
    return groups
