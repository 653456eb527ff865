"""CAM evolution: each panel bird's primary map at every panel epoch, kept small, shown at the end of ``fit``.

The thumbnails live in the callback's state (``state_dict``: uint8 tensors and plain lists, which checkpoints load
with ``weights_only=True``), so a resumed run's evolution covers every epoch, before and after the resume, with an
epoch rendered again (a resume from inside it) replacing the old frame instead of adding a second one.
Memory: ``THUMB``-px thumbnails, about 20 KB per bird and epoch (16 birds x 40 epochs: 12 MB).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cubcam.callbacks.panel_data import PANEL_COLUMNS, Panel
from cubcam.cams.figure import grid
from cubcam.cams.files import write_with

THUMB = 80  # longest side of a thumbnail, px


@dataclass
class Frame:
    """One panel epoch's thumbnails [N, h, w, 3] (uint8) of the birds ``indices``."""

    epoch: int
    indices: list[int]
    thumbnails: Tensor


def frame_of(panel: Panel) -> Frame:
    """The panel's primary maps, with their boxes, as thumbnails (made where the panel is rendered)."""
    thumbnails = torch.from_numpy(np.stack([thumbnail(cell) for cell in panel.primary_cells()]))
    return Frame(panel.epoch, list(panel.indices), thumbnails)


@dataclass
class Evolution:
    """The thumbnails of a fixed panel, one frame [N, h, w, 3] per panel epoch, in epoch order."""

    indices: list[int] = field(default_factory=list)  # the panel's dataset indices
    epochs: list[int] = field(default_factory=list)
    frames: list[Tensor] = field(default_factory=list)
    _figures: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False, compare=False)  # made once

    def add(self, frame: Frame) -> None:
        """An epoch's thumbnails (:func:`frame_of`); a new panel (other birds) starts a new evolution."""
        self._figures.clear()
        if frame.indices != self.indices:
            self.indices, self.epochs, self.frames = list(frame.indices), [], []
        if frame.epoch in self.epochs:
            self.frames[self.epochs.index(frame.epoch)] = frame.thumbnails
            return
        position = int(np.searchsorted(self.epochs, frame.epoch))
        self.epochs.insert(position, frame.epoch)
        self.frames.insert(position, frame.thumbnails)

    def __len__(self) -> int:
        return len(self.epochs)

    def bird_strips(self) -> list[np.ndarray]:
        """Per bird: its thumbnails left to right, each labelled with its epoch underneath, the first also with the
        bird (``#<dataset index>``), so that a label sits on its own strip where strips are stacked (made once for
        all sinks)."""
        if "strips" not in self._figures:
            self._figures["strips"] = [
                grid(
                    [frame[b].numpy() for frame in self.frames],
                    [f"#{index}, epoch {e}" if k == 0 else f"epoch {e}" for k, e in enumerate(self.epochs)],
                    ncols=len(self.frames),
                    font_size=11,
                )
                for b, index in enumerate(self.indices)
            ]
        return self._figures["strips"]

    def panel_frames(self) -> list[np.ndarray]:
        """Per epoch: the whole panel's thumbnails, ``PANEL_COLUMNS`` a row, captioned with the bird and the epoch
        (the GIF's frames; made once for all sinks)."""
        if "frames" not in self._figures:
            captions = [[f"#{i}, epoch {e}" for i in self.indices] for e in self.epochs]
            self._figures["frames"] = [
                grid(list(frame.numpy()), caption, ncols=PANEL_COLUMNS, font_size=11)
                for caption, frame in zip(captions, self.frames)
            ]
        return self._figures["frames"]

    def state_dict(self) -> dict[str, Any]:
        frames = torch.stack(self.frames) if self.frames else torch.zeros(0, dtype=torch.uint8)
        return {"indices": list(self.indices), "epochs": list(self.epochs), "frames": frames}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._figures.clear()
        self.indices, self.epochs = list(state.get("indices", [])), list(state.get("epochs", []))
        frames = state.get("frames")
        self.frames = list(frames) if frames is not None and len(frames) == len(self.epochs) else []
        if len(self.frames) != len(self.epochs):
            self.epochs = []


def thumbnail(cell: np.ndarray) -> np.ndarray:
    """A uint8 [H, W, 3] cell shrunk so that its longer side is at most ``THUMB`` px."""
    height, width = cell.shape[:2]
    scale = min(1.0, THUMB / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(cell).resize(size, Image.Resampling.BILINEAR))


def save_gif(frames: list[np.ndarray], path: Any, seconds_per_frame: float = 0.8) -> None:
    """An animated GIF looping over ``frames`` (all padded to the first frame's size)."""
    images = [Image.fromarray(frame) for frame in frames]
    duration = int(seconds_per_frame * 1000)
    write_with(
        path,
        lambda file: images[0].save(
            file, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0
        ),
    )
