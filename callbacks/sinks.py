"""Logging sinks: where a rendered :class:`~cubcam.callbacks.panel_data.Panel` goes, one small class each: W&B,
TensorBoard, MLflow and the PNG files (a further logger, Neptune or Comet, is one more class with these two
methods).

Lightning removed ``log_image`` from its base logger, so each logger is spoken to in its own API. A sink gets the
panel, its epoch and the step of that epoch's ``val/*`` metrics, so panels and metrics line up on any step axis.
A failing sink is the callback's business (it warns and goes on); a sink itself may raise.

A panel is logged in two parts: ``stage_panel`` runs where the panel was rendered (the callback's worker thread,
unless the callback is synchronous) and does the encoding and whatever its logger allows off the loop's thread;
the :data:`Commit` it returns runs on the loop's thread (W&B's log call: wandb's ``run.log`` is not thread-safe).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

from cubcam.callbacks.evolution import Evolution, save_gif
from cubcam.callbacks.panel_data import Panel, name
from cubcam.cams.figure import Strip, grid, png_bytes, save_png
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
    "index",
    "overlay",
    "true",
    "predicted",
    "score",
    "cam_box_iou",
    "heatmap_ratio",
    "peak_in_box",
    "epoch",
]


Commit = Callable[[], None]  # a sink's last part of logging a panel, on the loop's thread


def committed() -> None:
    """The commit of a sink that logged all of it while staging."""


class PanelSink(Protocol):
    """One destination of the panel: every panel epoch, and the evolution once at the end of ``fit`` (on the loop's
    thread)."""

    name: str  # for warnings: what failed

    def stage_panel(self, panel: Panel, step: int) -> Commit: ...

    def log_evolution(self, evolution: Evolution, step: int) -> None: ...


class WandbSink:
    """W&B: the panel as a ``wandb.Image`` list under ``val/cam_panel`` (GT and CAM boxes as W&B box groups) and a
    ``wandb.Table`` under ``val/cam_table`` (a row per bird, sortable: the worst-localized birds first), in one row
    that also carries ``epoch``, at the epoch's step; the evolution as an image list and an animated GIF.

    Most of what W&B's log call does with an image list is file work: copying each PNG and box group into the run,
    publishing the files, decoding every PNG again to check that the sizes match (about 100 ms for 16 birds, several
    times that while other threads want the GIL). Staging, off the loop's thread, does that part:
    :func:`serialized_images` binds the images to the run and makes the row's entry as wandb itself would, so the
    commit (on the loop's thread: wandb's ``run.log`` is not thread-safe, wandb #1824) logs a ready row, plus the box
    groups' class labels, which W&B keeps in the run's config, once per process (:func:`register_box_labels`). Where
    this wandb lacks a part of that, the commit hands W&B the images: the same row, slower. The strips go to W&B as
    PNGs written here at compression level 1 (W&B encodes arrays at Pillow's default level 6, several times slower),
    in a temporary folder removed at the next staging; only where the run may symlink media (the
    ``allow_media_symlink`` setting) does W&B get the arrays. The CAM scores are defined with ``summary="max"`` (the
    runs table shows the best epoch's), by exact key, on W&B's step axis ``trainer/global_step`` as WandbLogger
    defines ``*``.

    The table is one across epochs (column ``epoch``; W&B users compare epochs in one table, wandb issue #6286):
    ``wandb.Table(log_mode="INCREMENTAL")`` (wandb >= 0.19) gets each epoch's rows and uploads only those; a resumed
    run's rows are increments of the same key. Offline, each increment is a file of its epoch's rows (``media/
    table/val/cam_table_*.table.json``; W&B documents Server >= 0.70 for incremental tables). Where wandb has no
    ``log_mode``, each epoch logs a table of its own. Its overlay cells are the strips with their boxes drawn in, as
    in the PNG grid, as plain images: W&B copies and hashes each file of a table's cells into the table's artifact
    on the loop's thread, and box groups would triple the files. Rows join the table at the commit, in epoch order;
    the table is most of the commit's time (``bench/callback_overhead.py``).
    """

    def __init__(self, logger: Any, metric_keys: list[str]):
        self.logger = logger
        self.name = type(logger).__name__
        self._rows: Any = None  # the incremental table, made with the first panel
        self._labels_registered = False  # the box groups' class labels are in the run's config
        self._spent: list[tempfile.TemporaryDirectory[str]] = []  # committed panels' files, removed while staging
        for key in metric_keys:
            logger.experiment.define_metric(key, summary="max", step_metric="trainer/global_step")

    def stage_panel(self, panel: Panel, step: int) -> Commit:
        """The strips' PNG files, their ``wandb.Image`` objects bound to the run and the row's JSON, the table's
        cells; the commit logs them, with the table rows, in one row."""
        import wandb

        run = self.logger.experiment
        self._remove_spent()
        folder, sources = self._sources(panel, run)
        try:
            images = [
                wandb.Image(source, caption=caption, boxes=wandb_boxes(strip, panel.class_names))
                for source, strip, caption in zip(sources[0], panel.strips, panel.captions)
            ]
            cells = [wandb.Image(source) for source in sources[1]]
            serialized = serialized_images(run, PANEL_KEY, images, f"step{step}")
        except BaseException:
            if folder is not None:
                folder.cleanup()
            raise

        def commit() -> None:
            try:
                if serialized is not None and not self._labels_registered:  # else run.log registers them
                    register_box_labels(run, PANEL_KEY, images[0])
                    self._labels_registered = True
                row = {PANEL_KEY: images if serialized is None else serialized, "epoch": panel.epoch}
                self.logger.log_metrics({**row, TABLE_KEY: self._table(panel, cells)}, step=step)
            finally:
                if folder is not None:
                    self._spent.append(folder)

        return commit

    def _remove_spent(self) -> None:
        """Remove the files of the panels W&B has copied already: while staging, or at the end (unlinking them in
        the commit cost the loop's thread about 10 ms an epoch)."""
        while self._spent:
            self._spent.pop().cleanup()

    @staticmethod
    def _sources(panel: Panel, run: Any) -> tuple[tempfile.TemporaryDirectory[str] | None, list[list[Any]]]:
        """(the temporary folder to remove once W&B has copied its files, what W&B gets for each strip and each table
        cell: the strip without its boxes, and with them drawn)."""
        if getattr(run.settings, "allow_media_symlink", False):
            return None, [[strip.pixels for strip in panel.strips], [strip.boxed for strip in panel.strips]]
        folder = tempfile.TemporaryDirectory(prefix="cubcam-panel-")
        try:
            sources: list[list[Any]] = [[], []]
            for k, strip in enumerate(panel.strips):
                for part, pixels in enumerate((strip.pixels, strip.boxed)):
                    path = Path(folder.name) / f"{k:02d}-{part}.png"
                    path.write_bytes(png_bytes(pixels))  # a scratch file: no atomic write, no fsync
                    sources[part].append(str(path))
        except BaseException:
            folder.cleanup()
            raise
        return folder, sources

    def _table(self, panel: Panel, cells: list[Any]) -> Any:
        import wandb

        rows = [
            [
                row["index"],
                cell,
                row["true"],
                row["predicted"],
                row["score"],
                row["cam_box_iou"],
                row["heatmap_ratio"],
                row["peak_in_box"],
                panel.epoch,
            ]
            for row, cell in zip(panel.rows, cells)
        ]
        if self._rows is None:
            try:
                self._rows = wandb.Table(columns=list[str | int](TABLE_COLUMNS), log_mode="INCREMENTAL")
            except TypeError:  # wandb < 0.19: a table per epoch
                return wandb.Table(columns=list[str | int](TABLE_COLUMNS), data=rows)
        for row in rows:
            self._rows.add_data(*row)
        return self._rows

    def log_evolution(self, evolution: Evolution, step: int) -> None:
        import wandb

        self._remove_spent()
        with tempfile.TemporaryDirectory(prefix="cubcam-evolution-") as folder:
            strips = [
                save_png(strip, Path(folder) / f"{i}.png")
                for i, strip in zip(evolution.indices, evolution.bird_strips())
            ]
            save_gif(evolution.panel_frames(), Path(folder) / "evolution.gif")
            images = [wandb.Image(str(path), caption=f"#{i}") for path, i in zip(strips, evolution.indices)]
            self.logger.log_metrics(
                {EVOLUTION_KEY: images, EVOLUTION_GIF_KEY: wandb.Image(str(Path(folder) / "evolution.gif"))}, step=step
            )


class TensorBoardSink:
    """TensorBoard: the PNG grid as an image per panel epoch (tag ``val/cam_panel``, at the epoch's step; the CAM
    scores are scalars Lightning logs itself) and the evolution at the end (``val/cam_evolution``: every bird's
    strip of thumbnails, one under the other). Its event records are checksummed in C where google-crc32c is
    installed (:func:`fast_tensorboard_checksums`)."""

    def __init__(self, logger: Any):
        self.logger = logger
        self.name = type(logger).__name__
        fast_tensorboard_checksums()

    def stage_panel(self, panel: Panel, step: int) -> Commit:
        """All of it: the event writer queues under a lock of its own (thread-safe)."""
        self._add_image(PANEL_KEY, panel.grid, step, panel.grid_png)
        return committed

    def log_evolution(self, evolution: Evolution, step: int) -> None:
        image = grid(evolution.bird_strips(), ncols=1)  # each strip names its bird (on the strip, not below it)
        self._add_image(EVOLUTION_KEY, image, step, png_bytes(image))
        self.logger.experiment.flush()

    def _add_image(self, tag: str, image: np.ndarray, step: int, png: bytes) -> None:
        """``SummaryWriter.add_image(tag, image, step, dataformats="HWC")``, but with a PNG encoded here at level 1:
        TensorBoard's own encoder (level 6) was most of this sink's time. Where the writer lacks the file-writer
        API this uses, it falls back to ``add_image``."""
        writer = self.logger.experiment
        file_writer = getattr(writer, "_get_file_writer", None)
        if file_writer is None:
            writer.add_image(tag, image, step, dataformats="HWC")
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        encoded = Summary.Image(height=image.shape[0], width=image.shape[1], colorspace=3, encoded_image_string=png)
        file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=encoded)]), step)


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

    def log_evolution(self, evolution: Evolution, step: int) -> None:
        for index, strip in zip(evolution.indices, evolution.bird_strips()):
            self.client.log_image(self.run_id, strip, artifact_file=f"cam_evolution/evolution_{index}.png")
        with tempfile.TemporaryDirectory(prefix="cubcam-evolution-") as folder:
            path = Path(folder) / "evolution.gif"
            save_gif(evolution.panel_frames(), path)
            self.client.log_artifact(self.run_id, str(path), "cam_evolution")


class PngSink:
    """Files beside the checkpoints, with any logger or none: ``cam_panels/epoch_NNN.png`` every panel epoch, and
    at the end ``cam_panels/evolution_<dataset index>.png`` per bird and ``cam_panels/evolution.gif``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.name = f"the PNG grid in {folder}"

    def stage_panel(self, panel: Panel, step: int) -> Commit:
        write_bytes(self.folder / f"epoch_{panel.epoch:03d}.png", panel.grid_png)
        return committed

    def log_evolution(self, evolution: Evolution, step: int) -> None:
        for index, strip in zip(evolution.indices, evolution.bird_strips()):
            save_png(strip, self.folder / f"evolution_{index}.png")
        save_gif(evolution.panel_frames(), self.folder / "evolution.gif")


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
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def wandb_boxes(strip: Strip, class_names: list[str]) -> dict[str, Any]:
    """W&B's native box groups of a strip: ``ground_truth`` (green in the PNG) and ``cam`` (red), each with the
    ``class_labels``; both groups are always present (possibly with no boxes), so the UI toggles stay put."""
    groups = {}
    for group, boxes in (("ground_truth", strip.gt_boxes), ("cam", strip.cam_boxes)):
        data = [
            {
                "position": {
                    "minX": round(x),
                    "maxX": round(x + w),
                    "minY": round(y),
                    "maxY": round(y + h),
                },
                "domain": "pixel",
                "class_id": int(c),
                "box_caption": f"{group}: {name(class_names, c)}",
            }
            for (x, y, w, h), c in boxes
        ]
        # All names, the same dict for every image: W&B keeps one class_labels table per key in the run config.
        labels = {c: name(class_names, c) for c in range(max([len(class_names)] + [int(c) + 1 for _, c in boxes]))}
        groups[group] = {"box_data": data, "class_labels": labels}
    return groups


def fast_tensorboard_checksums() -> bool:
    """Point TensorBoard's event-record writer at google-crc32c's C CRC-32C; whether it could (the package and
    its C extension are there).

    TensorBoard without TensorFlow checksums each record in pure Python (``tensorboard.compat.tensorflow_stub``,
    about 130 ms per MB on this machine) in its writer thread, holding the GIL all along: the panel's PNG grid (1.5
    MB for 16 birds) cost the training loop's thread some 200 ms an epoch. The checksums are the same numbers (tested
    against TensorBoard's own function; the event files read back with its reader, which checks them); tensorboardX
    uses a C CRC-32C the same way. It changes every TensorBoard writer of the process, only in speed.
    """
    try:
        import google_crc32c
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    if getattr(google_crc32c, "implementation", "c") != "c":  # its pure-Python fallback is no faster
        return False

    def masked_crc32c(data: bytes) -> int:
        """TensorBoard's ``masked_crc32c``: the CRC-32C rotated right by 15 bits plus a constant (TFRecord's mask)."""
        crc = int(google_crc32c.value(data))
        return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF

    record_writer.masked_crc32c = masked_crc32c
    return True


BOX_LABELS = "bounding_box/class_labels"  # W&B's config entry of the box groups' class labels (its _add_singleton)


def serialized_images(run: Any, key: str, images: list[Any], namespace: str) -> dict[str, Any] | None:
    """The JSON that ``run.log({key: images})`` makes of an image list, made here, off the loop's thread; None where
    this wandb lacks a part (then ``run.log`` gets the images).

    It is wandb's own code (``val_to_json``) split where the run's shared state begins: each image's and box
    group's file is bound to the run (copied into its media folder, published: wandb's publishing is thread-safe),
    then ``seq_to_json`` makes the row's entry. What it leaves out is the box groups' class labels, which W&B keeps
    once per key in the run's config (not thread-safe): :func:`register_box_labels`. ``namespace`` is the part of
    the file names wandb fills with its history step (unknown off the loop's thread), any unique string.
    """
    import wandb

    try:
        from wandb.sdk.data_types.base_types.media import Media

        seq_to_json = wandb.Image.seq_to_json
        for image in images:
            Media.bind_to_run(image, run, key, namespace)
            for boxes in (image._boxes or {}).values():
                Media.bind_to_run(boxes, run, key, namespace)
        return dict(seq_to_json(images, run, key, namespace))
    except (ImportError, AttributeError, TypeError, AssertionError):  # another wandb's internals
        return None


def register_box_labels(run: Any, key: str, image: Any) -> None:
    """Put the class labels of ``image``'s box groups in the run's config, as wandb's ``BoundingBoxes2D`` does when
    it binds to a run, for the images :func:`serialized_images` bound (on the loop's thread). Every panel image has
    the same labels (:func:`wandb_boxes`), so once per process does."""
    for group, boxes in (getattr(image, "_boxes", None) or {}).items():
        run._add_singleton(BOX_LABELS, f"{key}_wandb_delimeter_{group}", boxes._class_labels)
