"""Off the loop's thread: what a panel epoch leaves to do once the model is no longer needed.

The loop's thread makes an :class:`EpochWork` at the validation epoch's end: the panel's and the metric subset's
maps at the layer's grid, with the boxes, labels and scores that go with them (CPU tensors, kilobytes to a few
megabytes, and plain values, so it can wait in a checkpoint: ``weights_only=True`` loads it). :func:`finish`
does the rest: upsampling to the image size, MaxBoxAccV2 and the other box metrics, rendering, PNG encoding,
the thumbnails of the evolution and each sink's share that is safe off the loop's thread (the PNG files,
TensorBoard's event writer, MLflow's client). What only the loop's thread may do (wandb's ``run.log`` is not
thread-safe, wandb #1824; logging the metrics through the loggers) comes back as :class:`Finished`, which the
callback logs at its next hook.

:class:`Worker` is one background thread (``WORKER_NAME``) fed in epoch order, so panels and metrics come back in
that order. The box labelling, interpreter-bound, goes on from there to worker processes
(``cubcam.cams.labelling.ScorePool``: the maps at the grid in, the accumulator rows out); the rest (upsampling the
panel, drawing, zlib encoding) releases the GIL for much of its time and needs no copy of its inputs, so one thread
does (``bench/callback_overhead.py`` measures what either costs the loop). ``close`` joins the thread.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, TypedDict

import numpy as np
from torch import Tensor

from cubcam.callbacks.evolution import Frame, frame_of
from cubcam.callbacks.measure import Scores, score_maps
from cubcam.callbacks.panel_data import Panel
from cubcam.callbacks.panel_render import NEIGHBOUR, Style, class_panel, neighbour_panel
from cubcam.callbacks.sinks import Commit, PanelSink
from cubcam.cams.labelling import ScorePool
from cubcam.cams.overlay import denormalize
from cubcam.cams.protocol import Choice

WORKER_NAME = "cubcam-campanel"
Layout = Literal["class", "neighbour"]  # panel_render's two views


class EpochWork(TypedDict):
    """One panel epoch's inputs to :func:`finish` (plain values and CPU tensors: saved in checkpoints as they are)."""

    epoch: int
    step: int  # of the epoch's val/* metrics: where its panel and CAM metrics are logged
    size: list[int]  # [H, W] of the images, which the maps are upsampled to
    num_slots: int  # the metric subset's size
    metrics: dict[str, Tensor] | None  # measure.subset_maps' (slot, maps, box); None: no metrics this epoch
    panel: dict[str, Tensor] | None  # panel_render's *_inputs; None: no panel this epoch (a warning said why)
    layout: Layout
    choice: Choice
    symbol: str  # the class score's name in captions (p, cos)
    names: list[str]  # the class names
    mean: list[float]  # the dataset's normalisation, to draw the images
    std: list[float]
    log: bool  # False: only the evolution's thumbnails (an epoch a resumed run's earlier process logged already)


@dataclass
class Finished:
    """What :func:`finish` hands back to the loop's thread."""

    epoch: int
    step: int
    log: bool = True  # the work's: log it, or only keep its thumbnails
    scores: Scores | None = None
    panel: Panel | None = None
    frame: Frame | None = None  # the evolution's thumbnails of the panel
    commits: list[tuple[str, Commit]] = field(default_factory=list)  # (sink name, what is left for the loop's thread)
    problems: list[str] = field(default_factory=list)  # warnings, given on the loop's thread


def finish(work: EpochWork, style: Style, sinks: list[PanelSink], pool: ScorePool | None) -> Finished:
    """Score, render and stage one epoch's work; a failure of any part is a problem in the result, never a raise."""
    done = Finished(work["epoch"], work["step"], work["log"])
    size = (work["size"][0], work["size"][1])
    style = Style(style.colormap, style.alpha, style.box_threshold)
    if work["metrics"] is not None:  # also for thumbnails alone: the CAM box is cut at the scores' threshold
        try:
            done.scores = score_maps(work["metrics"], work["num_slots"], size, pool)
        except Exception as err:
            done.problems.append(f"could not compute the CAM metrics of epoch {done.epoch}: {_error(err)}")
        if done.scores is not None and "non_finite_images" not in done.scores:
            style.box_threshold = float(done.scores["best_threshold_iou50"])
    if work["panel"] is None:
        return done
    try:
        done.panel = render(work, style)
        done.frame = frame_of(done.panel)
    except Exception as err:  # a figure must never end a training run
        done.problems.append(f"could not render the panel of epoch {done.epoch}: {_error(err)}")
        return done
    for sink in sinks if work["log"] else ():
        try:
            done.commits.append((sink.name, sink.stage_panel(done.panel, done.step)))
        except Exception as err:
            done.problems.append(f"could not log the panel of epoch {done.epoch} to {sink.name}: {_error(err)}")
    return done


def render(work: EpochWork, style: Style) -> Panel:
    """The panel of ``work`` (its ``panel`` inputs, drawn with ``style``)."""
    inputs = work["panel"]
    if inputs is None:
        raise ValueError("this epoch has no panel")

    def rgb(images: Tensor) -> list[np.ndarray]:
        return list(denormalize(images, work["mean"], work["std"]))

    if work["layout"] == "neighbour":
        neighbours = rgb(inputs[NEIGHBOUR + "image"])
        return neighbour_panel(inputs, rgb(inputs["image"]), neighbours, work["epoch"], work["names"], style)
    return class_panel(
        inputs, rgb(inputs["image"]), work["choice"], work["symbol"], work["epoch"], work["names"], style
    )


class Worker:
    """One background thread that finishes :class:`EpochWork` in the order it was submitted.

    Args:
        run: what finishes one work (:func:`finish` with the callback's style, sinks and labelling processes).
        max_pending: submitting more waits for the oldest first, so a worker slower than the epochs holds a bounded
            backlog (its wait is the loop's, and ``bench/callback_overhead.py`` reports it).
    """

    def __init__(self, run: Callable[[EpochWork], Finished], max_pending: int = 2):
        self._run, self.max_pending = run, max_pending
        self._executor: ThreadPoolExecutor | None = None
        self._queue: list[tuple[EpochWork, Future[Finished]]] = []

    def submit(self, work: EpochWork) -> list[Finished]:
        """Queue ``work``; returns what had to be finished first to keep the backlog under ``max_pending``."""
        waited = self.take(wait=len(self._queue) + 1 - self.max_pending)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=WORKER_NAME)
        self._queue.append((work, self._executor.submit(self._run, work)))
        return waited

    def take(self, wait: int = 0) -> list[Finished]:
        """The finished works at the head of the queue, in order, waiting for the first ``wait`` of them (all:
        ``len(self)``); a work whose thread raised comes back as a problem."""
        taken: list[Finished] = []
        while self._queue and (len(taken) < wait or self._queue[0][1].done()):
            work, future = self._queue.pop(0)
            try:
                taken.append(future.result())
            except BaseException as err:  # finish itself never raises; a KeyboardInterrupt in its thread might
                failed = f"the panel worker failed on epoch {work['epoch']}: {_error(err)}"
                taken.append(Finished(work["epoch"], work["step"], problems=[failed]))
        return taken

    def pending(self) -> list[EpochWork]:
        """The works submitted and not yet taken back (what a checkpoint keeps)."""
        return [work for work, _ in self._queue]

    def __len__(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        """Join the thread (after ``take(len(self))``, nothing is lost)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        self._queue.clear()


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"
