"""Every scored image as a thumbnail with its map, its boxes and its numbers: the gallery of ``report.html``.

While a split is scored, :class:`GalleryMaps` keeps per image what the page needs and nothing more: the image as a
JPEG thumbnail (about 5 KB), its map at ``MAP_SIDE`` px quantised to 8 bits (4 KB; the box metrics cut the maps at
their 8-bit levels too) and its GT box; about 55 MB for CUB's 5,794 test images, never the full-size maps. Once the
best CAM threshold is known, :meth:`GalleryMaps.write` draws each thumbnail (overlay, GT box green, CAM box red) into
``report_files/`` and gives each image's IoU there.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from cubcam.cams.figure import cam_box, draw_boxes
from cubcam.cams.localization import box_iou
from cubcam.cams.overlay import denormalize, overlay

THUMB = 128  # px: a gallery tile's side
MAP_SIDE = 64  # px: the side a kept map is resized to
JPEG_QUALITY = 85


@dataclass
class GalleryMaps:
    """What the gallery keeps of ``count`` images, by slot (the image's place in the scored split)."""

    count: int
    normalization: tuple[Sequence[float], Sequence[float]]
    thumbs: list[bytes] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)  # GT boxes (x, y, w, h) in thumbnail pixels

    def __post_init__(self) -> None:
        self.thumbs = [b""] * self.count
        self.maps = [np.zeros((MAP_SIDE, MAP_SIDE), np.uint8)] * self.count
        self.boxes = [np.zeros(4)] * self.count

    def add(self, slots: Sequence[int], images: Tensor, maps: Tensor, boxes: Tensor) -> None:
        """A batch: its normalised ``images`` [B, C, H, W], maps [B, H, W] in [0, 1] and GT ``boxes`` [B, 4] in the
        images' pixels."""
        height, width = images.shape[-2:]
        small = F.interpolate(maps.detach().float()[:, None], size=(MAP_SIDE, MAP_SIDE), mode="bilinear",
                              antialias=True, align_corners=False)[:, 0]  # fmt: skip
        levels = small.nan_to_num(0.0).clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
        pixels = denormalize(images.detach().cpu(), *self.normalization)
        scale = torch.tensor([THUMB / width, THUMB / height] * 2, dtype=torch.float64)
        for k, slot in enumerate(slots):
            buffer = io.BytesIO()
            Image.fromarray(pixels[k]).resize((THUMB, THUMB), Image.Resampling.BILINEAR).save(
                buffer, "JPEG", quality=JPEG_QUALITY
            )
            self.thumbs[slot], self.maps[slot] = buffer.getvalue(), levels[k]
            self.boxes[slot] = (boxes[k].detach().cpu().double() * scale).numpy()

    def write(self, folder: Path, threshold: float, colormap: str = "jet", alpha: float = 0.5) -> list[float | None]:
        """Each image's tile as ``folder/NNNNN.jpg`` (its slot; ``folder`` is a new one, which
        ``cubcam.train.inspection.report.files_folder`` swaps in whole), the CAM box cut at ``threshold``; returns
        each image's IoU of that box with its GT box (0 where the map has no box, None where the image has none)."""
        ious: list[float | None] = []
        for slot in range(self.count):
            image = np.asarray(Image.open(io.BytesIO(self.thumbs[slot])).convert("RGB"))
            cam = F.interpolate(
                torch.from_numpy(self.maps[slot]).float()[None, None] / 255, size=(THUMB, THUMB), mode="bilinear",
                align_corners=False,
            )[0, 0]  # fmt: skip
            box = cam_box(cam, threshold)
            gt = self.boxes[slot]
            has_gt = bool(gt[2] > 0 and gt[3] > 0)
            ious.append((float(box_iou(box, gt)) if box is not None else 0.0) if has_gt else None)
            tile = draw_boxes(overlay(image, cam, colormap, alpha), gt if has_gt else None, box)
            (folder / tile_name(slot)).write_bytes(jpeg(Image.fromarray(tile)))  # a new folder, swapped in whole
        return ious


def tile_name(slot: int) -> str:
    return f"{slot:05d}.jpg"


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
