"""The CAM methods without gradients: ScoreCAM, AblationCAM, EigenCAM (their entries in ``methods.METHODS``).

Each takes the target layer's activations as the engine's maps ``grid`` [B, K, h, w] and returns the raw map
ReLU(sum_k w_k A^k) [B, h, w] in float32, as pytorch-grad-cam's classes do (its ``score_cam.py``,
``ablation_cam.py``, ``eigen_cam.py``), with the differences each function names. ScoreCAM and AblationCAM only
call a score, so a class logit and an embedding's dot product with a proxy are explained alike; EigenCAM uses no
score. The engine (:class:`cubcam.cams.engine.CAM`) runs the forwards: everything here is arithmetic on what they
give, batched over (image, channel) pairs, ``chunk`` pairs per forward.

What they cost, for B images and K channels (ResNet-50's layer4: K = 2048):
- ScoreCAM: B * K forwards of the whole model on masked images (no head-only shortcut exists: the masks act on
  the input), so about K times a forward;
- AblationCAM: B * K forwards of the part above the layer (the head alone, where the model has one);
- EigenCAM: one forward and one SVD of a [h*w, K] matrix per image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

SCORECAM_EPS = 1e-8  # pytorch-grad-cam's, in the per-channel min-max of the masks
ABLATION_OFFSET = 1e7  # pytorch-grad-cam's: ablate this far below the minimum where activations can be negative
# (images [n], channels [n]) -> the score [n] of image images[r] with its channel channels[r] ablated
AblatedScores = Callable[[Tensor, Tensor], Tensor]
# (images [n], inputs [n, C, H, W]) -> the score [n] of inputs[r] (a masked copy of image images[r])
InputScores = Callable[[Tensor, Tensor], Tensor]


def pairs(batch: int, channels: int, chunk: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """Every (image, channel) pair in row-major order, as (images [n], channels [n]) chunks of at most ``chunk``."""
    flat = torch.arange(batch * channels, device=device)
    return [(part // channels, part % channels) for part in flat.split(chunk)]


def weighted_sum(weights: Tensor, grid: Tensor) -> Tensor:
    """ReLU(sum_k w_k A^k) [B, h, w] in float32."""
    return torch.relu((weights.float()[:, :, None, None] * grid.float()).sum(1))


def score_cam(images: Tensor, grid: Tensor, score: InputScores, chunk: int) -> Tensor:
    """ScoreCAM (Wang et al. 2020): w_k = softmax_k(y(x * M_k)) of the raw score of the input masked by channel k,
    M_k = the channel upsampled (bilinear, corners aligned, as ``torch.nn.UpsamplingBilinear2d``) and min-max
    normalised on its own. As pytorch-grad-cam: the softmax is over the raw scores (a logit, or ``<y, p>``), so a
    proxy score of a larger scale sharpens the weights as a logit of a larger scale does."""
    batch, channels = grid.shape[:2]
    scores = torch.empty(batch, channels, device=grid.device)
    size = tuple(images.shape[-2:])
    for image, channel in pairs(batch, channels, chunk, grid.device):
        masks = F.interpolate(grid[image, channel][:, None].float(), size=size, mode="bilinear", align_corners=True)
        low = masks.amin((2, 3), keepdim=True)
        masks = (masks - low) / (masks.amax((2, 3), keepdim=True) - low + SCORECAM_EPS)
        scores[image, channel] = score(image, images[image] * masks.to(images.dtype)).float()
    return weighted_sum(scores.softmax(1), grid)


class Ablation:
    """Copies of an image's layer output with one channel each set to the ablation value.

    The value is pytorch-grad-cam's: 0 where the image's smallest activation is 0 (a ReLU's output), else that
    minimum less ``ABLATION_OFFSET``. (pytorch-grad-cam writes it in place while it loops over a batch of copies,
    so its i-th copy gets minimum - i * 1e7 there; one value per image here, which equals it wherever the
    minimum is 0, and for a channel batch of 1 everywhere.)

    ``layer`` is the layer's output as the model passes it on, ``grid`` the map ``reshape`` makes of it; a channel
    of the grid is found in the layer's layout by passing the positions through ``reshape`` (which must only
    rearrange: ViT tokens to a grid, NHWC to NCHW; a class token it drops is left as it is).

    Raises:
        ValueError: ``reshape`` computes with the values rather than moving them.
    """

    def __init__(self, layer: Tensor, grid: Tensor, reshape: Callable[[Tensor], Tensor] | None):
        per_image = tuple(layer.shape[1:])
        count = layer[0].numel()
        if reshape is None:
            self.positions = torch.arange(count, device=layer.device).view(grid.shape[1], -1)
        else:
            probe = torch.arange(count, dtype=torch.float64, device=layer.device).view(1, *per_image)
            mapped = reshape(probe)[0].flatten(1)
            if (
                mapped.shape[0] != grid.shape[1]
                or not torch.equal(mapped, mapped.round())
                or mapped.min() < 0
                or mapped.max() >= count
                or len(mapped.unique()) != mapped.numel()
            ):
                raise ValueError(
                    "ablationcam finds each channel through the reshape, which must only rearrange the layer's "
                    "output (e.g. ViT tokens to a grid); this one computes with it"
                )
            self.positions = mapped.long()
        self.layer = layer.flatten(1)
        low = self.layer.amin(1)
        self.values = torch.where(low == 0, torch.zeros_like(low), low - ABLATION_OFFSET)
        self.shape = per_image

    def batch(self, images: Tensor, channels: Tensor) -> Tensor:
        """Image ``images[r]``'s layer output with channel ``channels[r]`` ablated, for every row r."""
        out = self.layer[images].clone()
        positions = self.positions[channels]
        out.scatter_(1, positions, self.values[images][:, None].expand_as(positions).to(out.dtype))
        return out.view(len(images), *self.shape)


def ablation_cam(grid: Tensor, scores: Tensor, ablated: AblatedScores, chunk: int) -> Tensor:
    """AblationCAM (Desai & Ramaswamy 2020): w_k = (y - y_k) / y, y_k the score with channel k ablated.

    The ratio divides by the score itself: a proxy score ``<y, p>`` near zero (an embedding almost orthogonal to
    its proxy) makes the weights huge and noisy, and a negative one flips their sign, so that the map shows what
    *raises* the score towards zero. A softmax probability or a well-aligned proxy (cosine well above 0) is safe."""
    batch, channels = grid.shape[:2]
    changed = torch.empty(batch, channels, device=grid.device)
    for image, channel in pairs(batch, channels, chunk, grid.device):
        changed[image, channel] = ablated(image, channel).float()
    base = scores.float()[:, None]
    return weighted_sum((base - changed) / base, grid)


def eigen_projection(grid: Tensor) -> Tensor:
    """The activations at each position [h*w, K], centred over the positions, projected on their first principal
    component (the first right singular vector): the signed map [B, h, w] before EigenCAM's ReLU (Muhammad &
    Yeasin 2020; pytorch-grad-cam's ``get_2d_projection``, NaNs read as 0).

    An SVD fixes a singular vector only up to its sign, and pytorch-grad-cam keeps whichever NumPy returns, so its
    map may be the negated one, which the ReLU then wipes out to the background. Here the sign is the one whose
    projection correlates positively with the mean activation over the channels: the map points where the layer
    is active."""
    batch, _, height, width = grid.shape
    a = torch.nan_to_num(grid.float(), nan=0.0).flatten(2).transpose(1, 2)  # [B, h*w, K]
    centred = a - a.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = (centred @ vh[:, 0, :, None])[..., 0]  # [B, h*w], mean 0 over the positions
    mean = a.mean(2)
    agreement = (projection * (mean - mean.mean(1, keepdim=True))).sum(1)
    sign = torch.where(agreement < 0, -1.0, 1.0).to(projection.device)
    return (projection * sign[:, None]).view(batch, height, width)


def eigen_cam(grid: Tensor) -> Tensor:
    """EigenCAM: ReLU of :func:`eigen_projection`; no score, so the map is the same for every class or proxy."""
    return torch.relu(eigen_projection(grid))
