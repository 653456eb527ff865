"""The picture thread: one daemon thread that turns finished epochs into pictures in the sinks.

Everything in :func:`draw` and the sinks' ``stage_*`` methods runs on that thread: rendering the panel, PNG
encoding, the PNG files, TensorBoard's and MLflow's calls. What only the loop's thread may do (W&B's ``run.log``,
wandb #1824) comes back as commits, which the callback runs at its next hook (:meth:`PictureThread.take`).

Nothing here holds anything a checkpoint needs: the metrics and the evolution's thumbnails are made on the loop's
thread before a job is submitted. A job is drawn at most once; a job that is not drawn when the process ends (a
SIGKILL, or :meth:`PictureThread.drain`'s timeout on the way out) is a lost picture, never lost metrics.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from cubcam.callbacks.evolution import Evolution
from cubcam.callbacks.panel_data import Panel
from cubcam.callbacks.panel_render import NEIGHBOUR, Style, class_panel, neighbour_panel, tile_pixels
from cubcam.callbacks.sinks import Commit, PanelSink
from cubcam.cams.protocol import Choice

THREAD_NAME = "cubcam-pictures"
Layout = Literal["class", "neighbour"]  # panel_render's two views
NICE = 10  # the picture thread's priority below the process's (Linux)
POLL = 0.05  # s: how often a wait on the loop's thread looks up (a signal interrupts it between looks)


@dataclass
class PanelJob:
    """One panel epoch, as the loop's thread leaves it: ``inputs`` are ``panel_render``'s ``*_inputs`` (CPU
    tensors at the layer's grid) and the rest what drawing them needs."""

    epoch: int
    step: int  # of the epoch's val/* metrics: where its panel is logged
    inputs: dict[str, Tensor]
    layout: Layout
    choice: Choice
    symbol: str  # the class score's name in captions (p, cos)
    names: list[str]
    normalization: tuple[list[float], list[float]]  # the dataset's mean and std, to draw the images
    style: Style


@dataclass
class EvolutionJob:
    """The evolution of the run, once at the end of ``fit`` (a copy: the loop's thread keeps its own)."""

    evolution: Evolution
    step: int
    style: Style
    epoch: int = -1  # in messages


@dataclass
class Drawn:
    """What a job leaves for the loop's thread: each sink's commit, warnings to give there, and an error that
    ended the drawing (a bug), which the loop's thread raises."""

    epoch: int
    commits: list[tuple[str, Commit]] = field(default_factory=list)  # (sink name, commit)
    problems: list[str] = field(default_factory=list)
    error: BaseException | None = None


def render(job: PanelJob) -> Panel:
    """The panel of ``job``."""
    inputs = dict(job.inputs)
    rgb, factor = tile_pixels(inputs["image"], job.normalization)
    for key in ("box", NEIGHBOUR + "box"):
        if key in inputs:  # into the pixels drawn (small images are enlarged)
            inputs[key] = inputs[key] * factor
    if job.layout == "neighbour":
        neighbours, _ = tile_pixels(inputs[NEIGHBOUR + "image"], job.normalization)
        return neighbour_panel(inputs, rgb, neighbours, job.epoch, job.names, job.style)
    return class_panel(inputs, rgb, job.choice, job.symbol, job.epoch, job.names, job.style)


def draw(job: PanelJob | EvolutionJob, sinks: list[PanelSink]) -> Drawn:
    """Render ``job`` and stage it in every sink. Running out of memory, and a sink's failure (its I/O and its
    logger's calls), are problems in the result, never a raise; anything else is a bug and raises."""
    drawn = Drawn(job.epoch)
    what = "the CAM evolution" if isinstance(job, EvolutionJob) else f"the panel of epoch {job.epoch}"
    try:
        if isinstance(job, EvolutionJob):
            figures, panel = job.evolution.figures(job.style.colormap, job.style.alpha), None
        else:
            figures, panel = None, render(job)
    except MemoryError as err:  # a large figure; training goes on without it
        drawn.problems.append(f"could not render {what}: {type(err).__name__}: {err}")
        return drawn
    for sink in sinks:
        try:
            if figures is not None:
                commit = sink.stage_evolution(figures, job.step)
            elif panel is not None:
                commit = sink.stage_panel(panel, job.step)
            drawn.commits.append((sink.name, commit))
        except Exception as err:  # the sink's files and logger calls: one sink's failure costs its picture only
            drawn.problems.append(f"could not log {what} to {sink.name}: {type(err).__name__}: {err}")
    return drawn


class PictureThread:
    """One daemon thread that draws jobs in the order they come (:func:`draw`); it starts with a job and ends when
    none is left.

    The loop's thread calls :meth:`submit`, :meth:`take`, :meth:`drain` and :meth:`close`; every wait there looks
    up every ``POLL`` seconds, so Ctrl-C and other signals interrupt it (nothing here catches them).

    Args:
        sinks: where the pictures go (called on the loop's thread when the thread starts).
        max_pending: :meth:`submit` waits while this many jobs are not drawn, so a thread slower than the epochs
            holds a bounded backlog.
    """

    def __init__(self, sinks: Callable[[], list[PanelSink]], max_pending: int = 2):
        self._sinks, self.max_pending = sinks, max_pending
        self._jobs: deque[PanelJob | EvolutionJob] = deque()
        self._drawing = False  # the thread is drawing a job it took from _jobs
        self._drawn: deque[Drawn] = deque()
        self._changed = threading.Condition()
        self._running = False  # a thread is drawing or about to
        self._threads: list[threading.Thread] = []  # those started and not yet joined (one ending, one starting)

    def _busy(self) -> int:
        return len(self._jobs) + self._drawing

    def submit(self, job: PanelJob | EvolutionJob) -> None:
        """Queue ``job``, after waiting while ``max_pending`` jobs are not drawn."""
        self._wait(lambda: self._busy() < self.max_pending)
        sinks = self._sinks()
        with self._changed:
            self._jobs.append(job)
            self._changed.notify_all()
            if not self._running:
                self._running = True
                thread = threading.Thread(target=self._run, args=(sinks,), name=THREAD_NAME, daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
                thread.start()

    def take(self) -> list[Drawn]:
        """The jobs drawn so far, in order (no wait)."""
        with self._changed:
            drawn, self._drawn = list(self._drawn), deque()
        return drawn

    def drain(self, timeout: float | None = None) -> tuple[list[Drawn], int]:
        """Wait until every job is drawn, or at most ``timeout`` seconds: (the drawn jobs, how many are dropped)."""
        self._wait(lambda: self._busy() == 0, timeout)
        with self._changed:
            dropped = self._busy()
            self._jobs.clear()  # a job being drawn ends in _drawn, where nobody takes it any more
        return self.take(), dropped

    def close(self, timeout: float | None = None) -> None:
        """Join the threads (one ends once no job is left; after :meth:`drain` that is at once)."""
        for thread in self._threads:
            thread.join(timeout)
        self._threads = [t for t in self._threads if t.is_alive()]

    def _wait(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        with self._changed:
            if timeout is not None:
                return self._changed.wait_for(done, timeout)
            while not done():  # short waits: the interpreter runs signal handlers between them
                self._changed.wait(POLL)
            return True

    def _run(self, sinks: list[PanelSink]) -> None:
        _lower_priority()
        while True:
            with self._changed:
                if not self._jobs:
                    self._running = False
                    return
                job = self._jobs.popleft()
                self._drawing = True
            try:
                drawn = draw(job, sinks)
            except BaseException as error:  # carried to the loop's thread, which raises it (as a Future does)
                drawn = Drawn(job.epoch, error=error)
            with self._changed:
                self._drawn.append(drawn)
                self._drawing = False
                self._changed.notify_all()


def _lower_priority() -> None:
    """Let the calling thread yield the cores to the training loop's threads: nice +``NICE`` where the system sets
    a thread's own priority (Linux: ``setpriority`` of its thread id); elsewhere nothing changes."""
    with contextlib.suppress(AttributeError, OSError):  # no setpriority (Windows), or not allowed
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + NICE)
