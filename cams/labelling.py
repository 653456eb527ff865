"""The localization scores of maps in worker processes: MaxBoxAccV2's labelling is interpreter-bound NumPy/SciPy
work (threads recover little of it: ``bench/localization_speed.py``), so it scales with processes.

    pool = ScorePool(processes=4)
    pool.start()                                              # from the main thread
    rows = pool.submit(raw_maps, boxes, (224, 224))           # a future: the batch's accumulator rows
    accumulator.add_rows(slots, rows.result())

A task is one batch of maps at the layer's grid (``[B, h, w]``, kilobytes), upsampled and scored in the worker
with ``LocalizationAccumulator.update`` itself, so the numbers are those of scoring in this process; back come
the batch's accumulator rows (a float64 row per image, 2.4 KB). Workers start with the ``spawn`` method (forking
after CUDA is initialised is unsafe), run one thread each, ignore Ctrl-C (the parent decides: it finishes or drops
the pending batches and then joins them) and are joined by :meth:`ScorePool.close`.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cubcam.cams.localization import LocalizationAccumulator
from cubcam.cams.protocol import upsample

# Below this many map pixels a job's scoring stays in its own process: starting processes costs seconds.
POOL_PIXELS = 64 * 224 * 224


def pays_off(count: int, size: tuple[int, int]) -> bool:
    """Whether ``count`` maps of ``size`` are worth worker processes (``POOL_PIXELS``)."""
    return count * size[0] * size[1] >= POOL_PIXELS


def score_rows(maps: np.ndarray, boxes: np.ndarray, size: tuple[int, int], parts: np.ndarray | None = None) -> Tensor:
    """The accumulator rows [B, C] of ``maps`` [B, h, w] (upsampled to ``size`` where they are at the layer's
    grid) with their GT ``boxes`` (and ``parts``), for ``LocalizationAccumulator.add_rows``."""
    cams = torch.from_numpy(maps)
    if tuple(cams.shape[-2:]) != tuple(size):
        cams = upsample(cams, size)
    accumulator = LocalizationAccumulator(len(cams))
    accumulator.update(np.arange(len(cams)), cams, boxes, parts)
    return accumulator.rows


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _quiet_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


class ScorePool:
    """Worker processes that score batches of raw maps (:func:`score_rows`); started at the first batch.

    Args:
        processes: how many (the cores this process may use beside its data loaders and its own thread).
    """

    def __init__(self, processes: int):
        if not isinstance(processes, int) or processes < 1:
            raise ValueError(f"processes must be a positive integer, got {processes!r}")
        self.processes = processes
        self._executor: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Start every worker now, from this thread, without the ``__main__`` module: ``spawn`` would import the
        user's script in each worker (an unguarded ``train.py`` would train again in every one). The workers import
        this module by name and nothing else of the user's."""
        if self._executor is not None:
            return
        executor = ProcessPoolExecutor(
            self.processes, mp_context=multiprocessing.get_context("spawn"), initializer=_quiet_worker
        )
        main = sys.modules["__main__"]
        saved: dict[str, Any] = {
            name: main.__dict__[name] for name in ("__file__", "__spec__") if name in main.__dict__
        }
        try:
            main.__spec__ = None  # what multiprocessing.spawn reads to import the main module in the child
            main.__dict__.pop("__file__", None)
            for _ in range(self.processes):  # a process starts per task submitted while none is idle
                executor.submit(int)
        finally:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)
        self._executor = executor

    def submit(self, maps: Tensor, boxes: Tensor, size: tuple[int, int], parts: Tensor | None = None) -> Future[Tensor]:
        """:func:`score_rows` of a batch, in a worker."""
        self.start()
        assert self._executor is not None
        grid, box = maps.detach().float().cpu().numpy(), boxes.detach().double().cpu().numpy()
        extra = None if parts is None else parts.detach().double().cpu().numpy()
        return self._executor.submit(score_rows, grid, box, size, extra)

    def close(self) -> None:
        """Join the workers (pending batches are dropped)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
