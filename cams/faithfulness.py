"""Faithfulness: does the model's score depend on what a map highlights?

Localization asks whether a map covers the object; a map can do that while ignoring the model (the centre Gaussian
does). Faithfulness perturbs the image in the map's order and watches a *bounded* score of what the map explains
(:meth:`cubcam.cams.targets.Target.confidence`: the softmax probability of the class, or an embedding's cosine to
its proxy clipped at 0):

- **deletion** (Petsiuk et al., BMVC 2018): the pixels, most important first, are replaced by the substrate, in
  ``steps`` equal shares; the area under the score curve is low when the map found what the score needs;
- **insertion**: the pixels, most important first, are put back onto a blurred copy of the image; the area is high
  when they are the ones that matter;
- **Average Drop** and **Increase in Confidence** (Chattopadhyay et al., WACV 2018): the image is multiplied by its
  map (``x * map``); Average Drop is the mean of ``max(0, Y - O) / Y`` and Increase in Confidence the share of
  images with ``O > Y`` (Y the score of the image, O of the masked one).

Inputs are normalised images, so the substrate, zero, is the dataset's mean colour: deletion paints pixels grey,
and ``x * map`` fades the image toward grey (as torch-cam and pytorch-grad-cam's ``CamMultImageConfidenceChange``
multiply the input tensor). Pixels are ranked once per map (ties: the earlier pixel first, as a stable sort), and
every step is one batched forward of the perturbed batch; the two ends of each curve do not depend on the map
(the image itself, the all-substrate image, the blurred canvas), so callers scoring several maps of the same images
pass them once (:class:`CurveEnds`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cubcam.cams.engine import minmax_normalize

Confidence = Callable[[Tensor], Tensor]  # perturbed images [B, C, H, W] -> a bounded score per image [B]
BLUR_SIGMA = 0.25  # of the shorter side: a canvas with the colours and layout of the image, not its detail


def blur(images: Tensor, sigma: float = BLUR_SIGMA) -> Tensor:
    """The insertion canvas: a separable Gaussian blur of ``sigma`` times the shorter image side, reflect-padded so
    the border keeps its colour."""
    sigma = sigma * min(images.shape[-2:])
    radius = min(max(1, math.ceil(2 * sigma)), min(images.shape[-2:]) - 1)  # reflect padding needs < side
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def pixel_ranks(maps: Tensor) -> Tensor:
    """Each pixel's place in its map's order, most important first: int64 [B, H * W] (0 = the highest value)."""
    flat = maps.flatten(1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def fractions(steps: int) -> Tensor:
    """The x axis of the curves: the share of pixels moved at each of the ``steps + 1`` points, 0 to 1."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return torch.linspace(0, 1, steps + 1, dtype=torch.float64)


def auc(curves: Tensor) -> Tensor:
    """Trapezoidal area under curves [B, steps + 1] sampled at :func:`fractions`: [B] in the scores' range."""
    return ((curves[:, :-1] + curves[:, 1:]) / 2).mean(1)


@dataclass
class CurveEnds:
    """The map-independent ends of the curves of one batch: the scores of the image (deletion's start, insertion's
    end), of the all-substrate image (deletion's end) and of the blurred canvas (insertion's start), [B] each."""

    image: Tensor
    substrate: Tensor
    canvas: Tensor


def perturbation_curve(
    confidence: Confidence, start: Tensor, end: Tensor, ranks: Tensor, steps: int, ends: tuple[Tensor, Tensor]
) -> Tensor:
    """Scores [B, steps + 1] as the pixels of ``end`` replace those of ``start``, ``round(k / steps)`` of them at
    step k in rank order; ``ends`` are the known scores of ``start`` and ``end`` (steps 0 and ``steps``)."""
    pixels = ranks.shape[1]
    columns = [ends[0].double()]
    for k in range(1, steps):
        moved = (ranks < round(k * pixels / steps)).view(len(ranks), 1, *start.shape[-2:])
        columns.append(confidence(torch.where(moved, end, start)).double())
    columns.append(ends[1].double())
    return torch.stack(columns, 1)


def deletion_insertion(
    confidence: Confidence, images: Tensor, maps: Tensor, steps: int, ends: CurveEnds, canvas: Tensor
) -> tuple[Tensor, Tensor]:
    """Deletion and insertion curves [B, steps + 1] of ``maps`` [B, H, W] on normalised ``images`` [B, C, H, W]
    (``canvas``: their :func:`blur`)."""
    fractions(steps)  # validates
    ranks = pixel_ranks(maps)
    substrate = torch.zeros_like(images[:1])
    deletion = perturbation_curve(confidence, images, substrate, ranks, steps, (ends.image, ends.substrate))
    insertion = perturbation_curve(confidence, canvas, images, ranks, steps, (ends.canvas, ends.image))
    return deletion, insertion


def confidence_change(confidence: Confidence, images: Tensor, maps: Tensor, base: Tensor) -> tuple[Tensor, Tensor]:
    """Per image (Chattopadhyay et al.): the relative drop ``max(0, Y - O) / Y`` and whether ``O > Y``, [B] each,
    where Y = ``base`` (the image's score) and O the score of ``images * maps``. An image whose Y is 0 has nothing
    to drop: its drop is 0."""
    masked = confidence(images * maps[:, None].to(images.dtype)).double()
    base = base.double()
    drop = torch.where(base > 0, (base - masked).clamp_min(0) / base.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return drop, masked > base


class FaithfulnessAccumulator:
    """Per-image deletion/insertion curves and confidence changes of one method, summed over batches.

    :meth:`compute` gives ``deletion_auc``, ``insertion_auc`` (means of the per-image areas), ``average_drop``,
    ``increase_in_confidence`` (fractions in [0, 1]), ``num_images`` and the mean curves ``deletion_curve`` /
    ``insertion_curve`` (lists of ``steps + 1`` scores, for plots); where ROAD was added (:mod:`cubcam.cams.road`)
    also ``road_morf``, ``road_lerf`` and ``road_combined`` = (LeRF - MoRF) / 2, means over the images.
    """

    def __init__(self, steps: int):
        self.steps = steps
        self.count = 0
        names = ("deletion", "insertion", "drop", "up", "morf", "lerf")
        self.sums = {name: torch.zeros((), dtype=torch.float64) for name in names}
        self.road_count = 0
        self.curves = {name: torch.zeros(steps + 1, dtype=torch.float64) for name in ("deletion", "insertion")}

    def update(
        self,
        deletion: Tensor,
        insertion: Tensor,
        drop: Tensor,
        increase: Tensor,
        road: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Add a batch's curves [B, steps + 1], confidence changes [B] and ROAD's (MoRF, LeRF) changes [B]."""
        if road is not None:
            for name, change in zip(("morf", "lerf"), road):
                self.sums[name] += change.detach().cpu().double().sum()
            self.road_count += len(drop)
        for name, curve in (("deletion", deletion), ("insertion", insertion)):
            curve = curve.detach().cpu().double()
            self.sums[name] += auc(curve).sum()
            self.curves[name] += curve.sum(0)
        self.sums["drop"] += drop.detach().cpu().double().sum()
        self.sums["up"] += increase.detach().cpu().double().sum()
        self.count += len(drop)

    def compute(self) -> dict[str, float | int | list[float]]:
        if not self.count:
            raise ValueError("no image was added to the faithfulness accumulator")
        n = self.count
        road: dict[str, float | int | list[float]] = {}
        if self.road_count:
            morf, lerf = (float(self.sums[name] / self.road_count) for name in ("morf", "lerf"))
            road = {"road_morf": morf, "road_lerf": lerf, "road_combined": (lerf - morf) / 2}
        return road | {
            "deletion_auc": float(self.sums["deletion"] / n),
            "insertion_auc": float(self.sums["insertion"] / n),
            "average_drop": float(self.sums["drop"] / n),
            "increase_in_confidence": float(self.sums["up"] / n),
            "num_images": n,
            "deletion_curve": (self.curves["deletion"] / n).tolist(),
            "insertion_curve": (self.curves["insertion"] / n).tolist(),
        }


def random_maps(batch: int, grid: tuple[int, int], size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """The random baseline: uniform noise drawn at the CAM layer's ``grid`` and upsampled to ``size`` as a CAM is
    (bilinear, then min-max to [0, 1]), so it has a CAM's smoothness and only its content is uninformed."""
    noise = torch.rand(batch, 1, *grid, generator=generator, dtype=torch.float32)
    return minmax_normalize(F.interpolate(noise, size=size, mode="bilinear", align_corners=False)[:, 0])
