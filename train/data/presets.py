"""Image loading and the train / eval transforms, which carry the bounding box and the part locations along.

A sample's box and parts must stay in the pixels of the image the model sees: the CAM callback and ``cubcam
evaluate`` compare heatmaps with them. Both presets therefore reduce to one geometric step, "cut a region out of the
original image and resize it to the output size" (``PIL.Image.resize(..., box=region)``, antialiased), whose exact
mapping is applied to the box (clipped to the output) and the parts (outside the output -> invisible). Pillow does
the pixels (torchvision's compiled ops may not load here); the random draws use torch's generator, so
``seed_everything`` and DataLoader worker seeding make them reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from cubcam.cams.overlay import IMAGENET_MEAN as MEAN
from cubcam.cams.overlay import IMAGENET_STD as STD

# CUB's 15 parts in parts/parts.txt order. A horizontal flip turns a left part into the right one.
PART_NAMES = (
    "back",
    "beak",
    "belly",
    "breast",
    "crown",
    "forehead",
    "left eye",
    "left leg",
    "left wing",
    "nape",
    "right eye",
    "right leg",
    "right wing",
    "tail",
    "throat",
)
FLIPPED_PARTS = [
    PART_NAMES.index(name.replace("left", "@").replace("right", "left").replace("@", "right")) for name in PART_NAMES
]

Region = tuple[float, float, float, float]  # left, top, right, bottom in the original image's pixels


def load_rgb(path: str | Path, exif_orientation: bool = False) -> Image.Image:
    """Decode any image file to RGB: grayscale (CUB has some), palette, CMYK, 16-bit; transparency is composited
    on white. Fully decoded here, so a truncated or corrupt file, or one over Pillow's decompression-bomb limit,
    fails now with one ``OSError`` naming it.

    ``exif_orientation`` turns the pixels as the EXIF orientation tag says, as a photo viewer shows them: for
    users' photos (a phone stores a portrait shot sideways, with the tag). Off for datasets: CUB's boxes and parts
    refer to the stored pixels.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image) if exif_orientation else image)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except Image.DecompressionBombError as err:  # not an OSError: above twice Image.MAX_IMAGE_PIXELS
        raise OSError(
            f"cannot read image {path}: {err} (Pillow's decompression-bomb guard; raise "
            f"PIL.Image.MAX_IMAGE_PIXELS if the image is trusted)"
        ) from err
    except (OSError, ValueError, SyntaxError) as err:  # PIL reports corrupt data with all three
        raise OSError(f"cannot read image {path}: {err}") from err


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale: keep the top 8 bits
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    elif image.mode == "F":  # float images: assume [0, 1]
        image = Image.fromarray((np.asarray(image) * 255).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def to_tensor(image: Image.Image, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> Tensor:
    """RGB PIL image -> normalised float Tensor[3, H, W]."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255)
    return pixels.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))


def cut_and_resize(
    image: Image.Image, box: Tensor, parts: Tensor, region: Region, size: int, flip: bool = False
) -> tuple[Image.Image, Tensor, Tensor]:
    """Cut ``region`` out of ``image`` and resize it to ``size`` x ``size`` (optionally mirrored), carrying the
    box (x, y, w, h; clipped to the output, empty -> zero size) and the parts ([15, 3] x, y, visible; a part that
    leaves the output becomes invisible, and invisible parts are (0, 0, 0))."""
    left, top, right, bottom = region
    scale = torch.tensor([size / (right - left), size / (bottom - top)])
    origin = torch.tensor([left, top])
    box = torch.as_tensor(box, dtype=torch.float32)
    parts = torch.as_tensor(parts, dtype=torch.float32)

    corners = ((torch.stack([box[:2], box[:2] + box[2:]]) - origin) * scale).clamp(0, size)
    xy = (parts[:, :2] - origin) * scale
    visible = (parts[:, 2] > 0) & (xy >= 0).all(1) & (xy < size).all(1)
    if flip:
        corners = torch.stack([size - corners[1, 0], corners[0, 1], size - corners[0, 0], corners[1, 1]]).view(2, 2)
        xy[:, 0] = size - xy[:, 0]
        xy, visible = xy[FLIPPED_PARTS], visible[FLIPPED_PARTS]
    new_box = torch.cat([corners[0], corners[1] - corners[0]])
    new_parts = torch.cat([xy, torch.ones(len(xy), 1)], 1) * visible[:, None]

    image = image.resize((size, size), Image.Resampling.BILINEAR, box=region)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image, new_box, new_parts


class EvalPreset:
    """Resize the shorter side to ``size * resize_ratio``, centre-crop ``size`` x ``size``, normalise (the
    torchvision-references evaluation transform), carrying box and parts."""

    def __init__(
        self, size: int, resize_ratio: float = 256 / 224, mean: Sequence[float] = MEAN, std: Sequence[float] = STD
    ):
        if size <= 0 or resize_ratio < 1:
            raise ValueError(f"need size > 0 and resize_ratio >= 1, got size={size}, resize_ratio={resize_ratio}")
        self.size, self.resize_ratio, self.mean, self.std = size, resize_ratio, tuple(mean), tuple(std)

    def region(self, width: int, height: int) -> Region:
        """The crop in the original image's pixels: a square of side ``min(width, height) / resize_ratio``."""
        side = min(width, height) / self.resize_ratio
        left, top = (width - side) / 2, (height - side) / 2
        return left, top, left + side, top + side

    def flip(self) -> bool:
        return False

    def __call__(self, image: Image.Image, box: Tensor, parts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        image, box, parts = cut_and_resize(image, box, parts, self.region(*image.size), self.size, self.flip())
        return to_tensor(image, self.mean, self.std), box, parts

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, resize_ratio={self.resize_ratio:.4g})"


class TrainPreset(EvalPreset):
    """The evaluation geometry with a random crop position and a horizontal flip of half of the images (resize the
    shorter side to ``size * resize_ratio``, random ``size`` x ``size`` crop, flip: the usual training transform of
    weakly-supervised localization on CUB). Box and parts are carried exactly (box clipped to the crop, parts
    outside it invisible, left/right parts swapped on a flip). Unlike RandomResizedCrop it keeps the bird's scale
    and aspect, so training images look like evaluation images: in the tests' 16-step trainings on the synthetic
    set that was worth ~0.25 of validation accuracy over RandomResizedCrop."""

    def __init__(
        self,
        size: int,
        resize_ratio: float = 256 / 224,
        flip_prob: float = 0.5,
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
    ):
        super().__init__(size, resize_ratio, mean, std)
        self.flip_prob = flip_prob

    def region(self, width: int, height: int) -> Region:
        side = min(width, height) / self.resize_ratio
        left, top = (torch.rand(2) * torch.tensor([width - side, height - side])).tolist()
        return left, top, left + side, top + side

    def flip(self) -> bool:
        return torch.rand(1).item() < self.flip_prob
