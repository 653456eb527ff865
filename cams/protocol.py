"""CAMs of a module that speaks cubcam's CAM protocol: ``module.cam_target_layer`` (the layer to explain) and
``module.forward_head(activations)`` (the rest of the net, from that layer's output).

One backbone forward gives the activations; every map after that runs through the head alone, so any number of
targets or proxies, and activations kept from a validation loop, cost no further backbone pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cubcam.cams.engine import EmbeddingCAM, GradCAM, minmax_normalize


def features_and_outputs(module: Any, images: Tensor) -> tuple[Tensor, Tensor]:
    """One eval-mode forward without autograd: (the target layer's activations [B, K, h, w], the outputs).

    Every submodule's train/eval flag is restored afterwards (BatchNorm statistics are never updated).
    """
    captured: list[Tensor] = []
    handle = module.cam_target_layer.register_forward_hook(lambda _m, _i, output: captured.append(output))
    modules = list(module.modules())
    flags = [m.training for m in modules]
    try:
        for m in modules:
            m.training = False
        with torch.no_grad():
            outputs = module(images)
    finally:
        handle.remove()
        for m, flag in zip(modules, flags):
            m.training = flag
    if len(captured) != 1:
        raise RuntimeError(f"the CAM target layer ran {len(captured)} times in one forward; expected once")
    return captured[0], outputs


def head_cams(module: Any, feature_maps: Tensor, size: tuple[int, int], *, targets: Tensor | None = None,
              proxies: Tensor | None = None) -> Tensor:
    """GradCAM (``targets`` [B]) or EmbeddingCAM (``proxies`` [B, D]) maps [B, H, W] in [0, 1] from activations.

    The same maps the engine computes through the whole net: the raw map at the layer's resolution, bilinearly
    upsampled to ``size``, then min-max normalised per image. Safe inside ``torch.inference_mode`` (as in
    Lightning's validation hooks): it leaves inference mode for the gradient and clones inference tensors.
    """
    dtype = next(module.parameters()).dtype  # activations kept from a mixed-precision loop may be half
    with torch.inference_mode(False), torch.enable_grad():
        features = _normal(feature_maps).to(dtype)
        if proxies is None:
            raw = GradCAM(module.forward_head, None)(features, _normal(targets), upsample=False, normalize=False)
        else:
            raw = EmbeddingCAM(module.forward_head, None)(features, _normal(proxies), upsample=False, normalize=False)
    return minmax_normalize(F.interpolate(raw[:, None], size=size, mode="bilinear", align_corners=False)[:, 0])


def _normal(tensor: Tensor | None) -> Tensor | None:
    """Autograd cannot save inference tensors for backward: a clone made outside inference mode is a normal one."""
    return tensor.clone() if tensor is not None and tensor.is_inference() else tensor
