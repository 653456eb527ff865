"""Heatmap overlays as uint8 RGB arrays, ready for W&B, PIL or a PNG grid (no matplotlib, no OpenCV)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what torchvision's pretrained weights expect, and cubcam's presets use
IMAGENET_STD = (0.229, 0.224, 0.225)

# Piecewise-linear colormaps as (position, value) knots per channel; "jet" and "hot" match matplotlib's.
_COLORMAPS: dict[str, tuple[tuple[tuple[float, float], ...], ...]] = {
    "jet": (
        ((0, 0), (0.35, 0), (0.66, 1), (0.89, 1), (1, 0.5)),
        ((0, 0), (0.125, 0), (0.375, 1), (0.64, 1), (0.91, 0), (1, 0)),
        ((0, 0.5), (0.11, 1), (0.34, 1), (0.65, 0), (1, 0)),
    ),
    "hot": (
        ((0, 0.0416), (0.365079, 1), (1, 1)),
        ((0, 0), (0.365079, 0), (0.746032, 1), (1, 1)),
        ((0, 0), (0.746032, 0), (1, 1)),
    ),
    "gray": (((0, 0), (1, 1)),) * 3,
}


LEVELS = 1024  # a colormap is looked up at this many evenly spaced values (a step of 1/1023: under a uint8 level)


def colorize(cam_map: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """Map values in [0, 1] to float32 RGB in [0, 1] (shape [..., 3]), through a table of ``LEVELS`` colours."""
    return _table(colormap)[_levels(cam_map)]


def _levels(cam_map: np.ndarray) -> np.ndarray:
    """Each value's row in a colour table of ``LEVELS`` rows; a diverged model's NaN map shows no heat."""
    values = np.nan_to_num(np.clip(cam_map, 0.0, 1.0), nan=0.0)
    return (values * (LEVELS - 1) + 0.5).astype(np.uint16)  # rounds: values are >= 0


@functools.cache
def _blend_table(colormap: str, alpha: float) -> np.ndarray:
    """The colour table in pixel units, times ``alpha``: what a blend adds to ``(1 - alpha)`` times the pixels."""
    return _table(colormap) * np.float32(255.0 * alpha)


@functools.cache
def _table(colormap: str) -> np.ndarray:
    """The colormap's colours at ``LEVELS`` evenly spaced values, float32 [LEVELS, 3]."""
    if colormap not in _COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}; choose one of {sorted(_COLORMAPS)}")
    values = np.linspace(0.0, 1.0, LEVELS)
    channels = []
    for knots in _COLORMAPS[colormap]:
        positions, levels = (np.asarray(column, dtype=np.float64) for column in zip(*knots))
        channels.append(np.interp(values, positions, levels))
    return np.stack(channels, axis=-1).astype(np.float32)


def overlay(
    image: Tensor | np.ndarray, cam_map: Tensor | np.ndarray, colormap: str = "jet", alpha: float = 0.5
) -> np.ndarray:
    """Blend a heatmap over an image: ``(1 - alpha) * image + alpha * colormap(map)`` as uint8 [H, W, 3].

    ``image``: float [3, H, W] in [0, 1] (a de-normalised tensor), uint8 [H, W, 3] / [H, W], or a float numpy
    [H, W, 3] in [0, 1] (pytorch-grad-cam's ``show_cam_on_image`` convention).
    ``cam_map``: [H, W] in [0, 1]; a map of another size is resized bilinearly to the image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    pixels = _as_pixels(image)
    cam = torch.as_tensor(cam_map).detach().float().cpu()
    if cam.dim() != 2:
        raise ValueError(f"cam_map must be [H, W], got shape {tuple(cam.shape)}")
    if cam.shape != pixels.shape[:2]:
        cam = F.interpolate(cam[None, None], size=pixels.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    # In pixel units: pixels in [0, 255] and the table in [0, 255 * alpha], so the sum needs no clipping.
    blended = np.multiply(pixels, np.float32(1.0 - alpha), out=pixels)
    blended += _blend_table(colormap, float(alpha))[_levels(cam.numpy())]
    return np.rint(blended, out=blended).astype(np.uint8)


def denormalize(
    image: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """Normalised Tensor[C, H, W] or [B, C, H, W] -> uint8 numpy [H, W, 3] or [B, H, W, 3]: what a model saw, as
    pixels to overlay a map on.

    Any channel count C: ``mean`` and ``std`` hold one value or one per channel (a grayscale dataset's one-value
    ``Normalize((0.1307,), (0.3081,))`` fits); one or two channels are drawn gray (their mean), three or more as the
    first three (RGB; a fourth, e.g. near-infrared or alpha, is not drawn). A uint8 tensor (a dataset that serves
    raw pixels and leaves the scaling to the model) is taken as the pixels themselves; other integer types are
    refused, as there is no telling what their values mean.
    """
    if image.dim() not in (3, 4):
        raise ValueError(f"expected an image [C, H, W] or a batch [B, C, H, W], got shape {tuple(image.shape)}")
    channels = image.shape[-3]
    if image.dtype == torch.uint8:
        return _as_rgb(image.detach().cpu().float()).round().to(torch.uint8).movedim(-3, -1).numpy()
    if not image.is_floating_point():
        raise TypeError(f"images must be float (normalised) or uint8 (pixels), got {image.dtype}")
    for what, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise ValueError(
                f"{what} has {len(values)} values for images of {channels} channel(s): give the dataset's own mean "
                f"and std, one value or one per channel"
            )
    shape = (len(mean), 1, 1), (len(std), 1, 1)
    image = image.detach().float().cpu()
    pixels = image * torch.tensor(std, dtype=torch.float32).view(shape[1]) + torch.tensor(mean).view(shape[0])
    return _as_rgb(pixels.mul(255)).round().clamp(0, 255).to(torch.uint8).movedim(-3, -1).numpy()


def _as_rgb(pixels: Tensor) -> Tensor:
    """[..., C, H, W] -> [..., 3, H, W]: one or two channels as gray (their mean), else the first three."""
    if pixels.shape[-3] >= 3:
        return pixels[..., :3, :, :]
    return pixels.mean(-3, keepdim=True).expand(*pixels.shape[:-3], 3, *pixels.shape[-2:])


def _as_pixels(image: Tensor | np.ndarray) -> np.ndarray:
    """``image`` as float32 [H, W, 3] pixel values in [0, 255] (a new array, free to be written)."""
    if isinstance(image, Tensor):
        image = image.detach().float().cpu()
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"a tensor image must be [3, H, W] or [1, H, W], got shape {tuple(image.shape)}")
        if image.min() < -1e-3 or image.max() > 1 + 1e-3:
            raise ValueError("a float image must lie in [0, 1]; de-normalise it first")
        return image.expand(3, -1, -1).permute(1, 2, 0).clamp(0, 1).mul(255).numpy()
    array = np.asarray(image)
    if np.issubdtype(array.dtype, np.floating) and array.ndim == 3 and array.shape[-1] == 3:
        # pytorch-grad-cam's show_cam_on_image convention: float [H, W, 3] in [0, 1]
        if array.min() < -1e-3 or array.max() > 1 + 1e-3:
            raise ValueError("a float [H, W, 3] image must lie in [0, 1]")
        return (array.clip(0, 1) * 255).astype(np.float32)
    if array.dtype != np.uint8:
        raise ValueError(
            f"a numpy image must be uint8 [H, W, 3] or [H, W] (or float [H, W, 3] in [0, 1]), got {array.dtype}"
        )
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"a numpy image must be [H, W, 3] or [H, W], got shape {array.shape}")
    return array[..., :3].astype(np.float32)
