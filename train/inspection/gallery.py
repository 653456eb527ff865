"""Every scored image as a thumbnail with its map, its boxes and its numbers: the gallery of ``report.html``.

While a split is scored, :class:`GalleryMaps` keeps one thing per image: its map at ``MAP_SIDE`` px quantised to 8
bits (4 KB; the box metrics cut the maps at their 8-bit levels too), resized where the map is (the accelerator) and
copied once per batch: about 23 MB for CUB's 5,794 test images, and nothing on the scoring loop's CPU beyond that
copy (a JPEG per image there cost 2.5 ms, twenty times an A100's forward of it). Once the best CAM threshold is known,
:func:`write_tiles` draws every tile (overlay, GT box green, CAM box red) in the data loader's worker processes,
reading each image from the dataset again, and gives each image's IoU there.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cubcam.cams.figure import cam_box, draw_boxes
from cubcam.cams.localization import box_iou
from cubcam.cams.overlay import denormalize, overlay

THUMB = 128  # px: a gallery tile's side
MAP_SIDE = 64  # px: the side a kept map is resized to
JPEG_QUALITY = 85


class GalleryMaps:
    """The maps of ``count`` images, by slot (the image's place in the scored split), as ``MAP_SIDE`` px uint8."""

    def __init__(self, count: int):
        self.maps = torch.zeros(count, MAP_SIDE, MAP_SIDE, dtype=torch.uint8)

    def add(self, slots: Sequence[int], maps: Tensor) -> None:
        """A batch's maps [B, H, W] in [0, 1] (a diverged model's NaN as 0), resized where they are."""
        small = F.interpolate(maps.detach().float()[:, None], size=(MAP_SIDE, MAP_SIDE), mode="bilinear",
                              antialias=True, align_corners=False)[:, 0]  # fmt: skip
        levels = small.nan_to_num(0.0).clamp(0, 1).mul(255).round().to(torch.uint8)
        self.maps[list(slots)] = levels.cpu()


@dataclass
class Tiles(Dataset):
    """A DataLoader's dataset of the tiles: item ``slot`` is, for each ``(maps, threshold)`` of ``layers``, the JPEG
    of image ``slot`` of ``dataset`` with that map and its boxes, and the IoU of its CAM box with the GT box (NaN
    where the image has no box). Runs in the loader's workers."""

    dataset: Any  # items with "image" (normalised) and "box" (x, y, w, h in the image's pixels)
    layers: list[tuple[Tensor, float]]
    normalization: tuple[Sequence[float], Sequence[float]]
    colormap: str = "jet"
    alpha: float = 0.5

    def __len__(self) -> int:
        return len(self.layers[0][0])

    def __getitem__(self, slot: int) -> list[tuple[bytes, float]]:
        item = self.dataset[slot]
        image = item["image"]
        height, width = image.shape[-2:]
        pixels = denormalize(image, *self.normalization)
        pixels = np.asarray(Image.fromarray(pixels).resize((THUMB, THUMB), Image.Resampling.BILINEAR))
        gt = np.asarray(item["box"], dtype=np.float64).reshape(4) * np.array([THUMB / width, THUMB / height] * 2)
        has_gt = bool(gt[2] > 0 and gt[3] > 0)
        drawn = []
        for maps, threshold in self.layers:
            cam = F.interpolate(maps[slot].float()[None, None] / 255, size=(THUMB, THUMB), mode="bilinear",
                                align_corners=False)[0, 0]  # fmt: skip
            box = cam_box(cam, threshold)
            iou = (float(box_iou(box, gt)) if box is not None else 0.0) if has_gt else math.nan
            tile = draw_boxes(overlay(pixels, cam, self.colormap, self.alpha), gt if has_gt else None, box)
            drawn.append((jpeg(Image.fromarray(tile)), iou))
        return drawn


def write_tiles(folders: list[Path], tiles: Tiles, num_workers: int) -> list[list[float | None]]:
    """Every tile of ``tiles`` as ``<folder>/NNNNN.jpg`` (its slot; a folder per layer, new ones that
    ``cubcam.train.inspection.report.files_folder`` swaps in whole); returns per layer each image's IoU (None:
    no GT box)."""
    ious: list[list[float | None]] = [[] for _ in folders]
    loader = DataLoader(tiles, batch_size=None, num_workers=num_workers)  # one slot an item, in order
    for slot, drawn in enumerate(loader):
        for k, (data, iou) in enumerate(drawn):
            (folders[k] / tile_name(slot)).write_bytes(data)
            ious[k].append(None if math.isnan(iou) else iou)
    return ious


def cam_threshold(scores: dict[str, Any]) -> float:
    """Where a gallery cuts its CAM boxes: the threshold at which box accuracy at IoU 0.5 is best over the split
    (``cubcam.cams.localization``'s ``best_threshold_iou50``), 0.5 where none was found (no image had a box)."""
    value = scores.get("best_threshold_iou50")
    return 0.5 if value is None or not math.isfinite(value) else float(value)


def tile_name(slot: int) -> str:
    return f"{slot:05d}.jpg"


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
