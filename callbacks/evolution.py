"""CAM evolution: each panel bird's primary map at every panel epoch, kept small, shown at the end of ``fit``.

An epoch's :class:`Frame` is made at the validation epoch's end on the loop's thread (:func:`frame_of`: the birds'
images shrunk to ``THUMB`` px, their maps at the layer's grid, their boxes and the epoch's CAM-box threshold: a few
small tensors, milliseconds), so every checkpoint holds every epoch's frame. The frames live in the callback's
state (``state_dict``: tensors and plain lists, which checkpoints load with ``weights_only=True``), so a resumed
run's evolution covers every epoch, before and after the resume, with an epoch validated again (a resume from
inside it) replacing its old frame. They are drawn once, at the end of ``fit``, on the picture thread. Memory:
about 20 KB per bird and epoch (16 birds x 40 epochs: 12 MB).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from cubcam.callbacks.panel_data import PANEL_COLUMNS
from cubcam.cams.figure import cam_tile, grid
from cubcam.cams.files import write_with
from cubcam.cams.overlay import denormalize
from cubcam.cams.protocol import upsample

THUMB = 80  # longest side of a thumbnail, px
STATE_KEYS = ("indices", "epochs", "pixels", "maps", "boxes", "thresholds")


@dataclass
class Frame:
    """One panel epoch of the birds ``indices``: their pixels [N, h, w, 3] (uint8, ``THUMB`` px), their primary
    maps [N, gh, gw] at the layer's grid (float32, as explained), their GT boxes [N, 4] in the thumbnails' pixels
    and the threshold the CAM box is cut at."""

    epoch: int
    indices: list[int]
    pixels: Tensor
    maps: Tensor
    boxes: Tensor
    threshold: float


def frame_of(
    epoch: int, birds: dict[str, Tensor], maps: Tensor, normalization: tuple[list[float], list[float]], threshold: float
) -> Frame:
    """The frame of the birds (``index``, ``image`` [N, 3, H, W] as the model saw them, ``box`` [N, 4]) and their
    primary ``maps`` [N, gh, gw] at the layer's grid: the images are shrunk to ``THUMB`` px here."""
    images = birds["image"].detach()
    height, width = images.shape[-2:]
    scale = min(1.0, THUMB / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if scale < 1:
        small = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        images = small if images.is_floating_point() else small.round().clamp(0, 255).to(torch.uint8)
    pixels = torch.from_numpy(denormalize(images, *normalization))
    boxes = birds["box"].detach().cpu().float() * torch.tensor([size[1] / width, size[0] / height] * 2)
    return Frame(epoch, birds["index"].tolist(), pixels, maps.detach().float().cpu(), boxes, float(threshold))


@dataclass
class Figures:
    """The evolution drawn: per bird a strip of its thumbnails (``strips``), per epoch the panel (``frames``)."""

    indices: list[int]
    strips: list[np.ndarray]
    frames: list[np.ndarray]


@dataclass
class Evolution:
    """The frames of a fixed panel, one per panel epoch, in epoch order."""

    indices: list[int] = field(default_factory=list)  # the panel's dataset indices
    frames: list[Frame] = field(default_factory=list)

    @property
    def epochs(self) -> list[int]:
        return [frame.epoch for frame in self.frames]

    def add(self, frame: Frame) -> None:
        """An epoch's frame (:func:`frame_of`); a new panel (other birds) starts a new evolution, and an epoch seen
        before is replaced."""
        if frame.indices != self.indices:
            self.indices, self.frames = list(frame.indices), []
        self.frames = sorted([f for f in self.frames if f.epoch != frame.epoch] + [frame], key=lambda f: f.epoch)

    def __len__(self) -> int:
        return len(self.frames)

    def tiles(self, colormap: str, alpha: float) -> list[list[np.ndarray]]:
        """Per epoch, each bird's thumbnail: its map over it, its GT box and its CAM box."""
        drawn = []
        for frame in self.frames:
            # thumbnails of small images (28 px digits) enlarged pixel for pixel to about THUMB px, as drawn only
            factor = max(1, THUMB // max(int(frame.pixels.shape[1]), int(frame.pixels.shape[2])))
            pixels = frame.pixels.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
            boxes = frame.boxes * factor
            size = (int(pixels.shape[1]), int(pixels.shape[2]))
            heat = upsample(torch.nan_to_num(frame.maps, nan=0.0, posinf=0.0, neginf=0.0), size)
            drawn.append(
                [
                    cam_tile(pixels[b].numpy(), heat[b], boxes[b], colormap, alpha, frame.threshold)
                    for b in range(len(pixels))
                ]
            )
        return drawn

    def figures(self, colormap: str, alpha: float) -> Figures:
        """Everything the sinks show of the evolution, drawn once for all of them."""
        tiles = self.tiles(colormap, alpha)
        return Figures(list(self.indices), self.bird_strips(tiles), self.panel_frames(tiles))

    def bird_strips(self, tiles: list[list[np.ndarray]]) -> list[np.ndarray]:
        """Per bird: its ``tiles`` (:meth:`tiles`) left to right, each labelled with its epoch underneath, the first
        also with the bird (``#<dataset index>``), so that a label sits on its own strip where strips are stacked."""
        epochs = self.epochs
        return [
            grid(
                [tiles[e][b] for e in range(len(epochs))],
                [f"#{index}, epoch {epoch}" if k == 0 else f"epoch {epoch}" for k, epoch in enumerate(epochs)],
                ncols=len(epochs),
                font_size=11,
            )
            for b, index in enumerate(self.indices)
        ]

    def panel_frames(self, tiles: list[list[np.ndarray]]) -> list[np.ndarray]:
        """Per epoch: the whole panel's ``tiles``, ``PANEL_COLUMNS`` a row, captioned with the bird and the epoch
        (the GIF's frames)."""
        return [
            grid(row, [f"#{i}, epoch {epoch}" for i in self.indices], ncols=PANEL_COLUMNS, font_size=11)
            for row, epoch in zip(tiles, self.epochs)
        ]

    def state_dict(self) -> dict[str, Any]:
        def stacked(key: str) -> Tensor:
            values = [getattr(frame, key) for frame in self.frames]
            return torch.stack(values) if values else torch.zeros(0)

        return {
            "indices": list(self.indices),
            "epochs": self.epochs,
            "pixels": stacked("pixels"),
            "maps": stacked("maps"),
            "boxes": stacked("boxes"),
            "thresholds": torch.tensor([frame.threshold for frame in self.frames], dtype=torch.float32),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A saved evolution; ValueError (naming what is wrong) for one this class did not write."""
        if not isinstance(state, dict) or set(state) != set(STATE_KEYS):
            got = f"keys {sorted(map(str, state))}" if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"the evolution state must have {', '.join(STATE_KEYS)}, got {got}")
        indices, epochs = state["indices"], state["epochs"]
        for key, values in (("indices", indices), ("epochs", epochs)):
            if not isinstance(values, list) or not all(isinstance(v, int) and v >= 0 for v in values):
                raise ValueError(f"the evolution's {key} must be a list of non-negative integers")
        if len(set(epochs)) != len(epochs):
            raise ValueError("the evolution has an epoch twice")
        n, e = len(indices), len(epochs)
        shapes = {"pixels": (e, n, -1, -1, 3), "maps": (e, n, -1, -1), "boxes": (e, n, 4), "thresholds": (e,)}
        for key, shape in shapes.items():
            value = state[key]
            if not isinstance(value, Tensor) or (value.dtype == torch.uint8) != (key == "pixels"):
                raise ValueError(f"the evolution's {key} must be a {'uint8' if key == 'pixels' else 'float'} tensor")
            if e and (value.dim() != len(shape) or any(s not in (-1, v) for s, v in zip(shape, value.shape))):
                raise ValueError(f"the evolution's {key} must be {list(shape)} (-1: any), got {list(value.shape)}")
        self.indices = list(indices)
        self.frames = sorted(
            (
                Frame(epoch, list(indices), state["pixels"][k], state["maps"][k], state["boxes"][k], float(threshold))
                for k, (epoch, threshold) in enumerate(zip(epochs, state["thresholds"].tolist()))
            ),
            key=lambda f: f.epoch,
        )


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
