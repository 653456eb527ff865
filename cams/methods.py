"""The CAM methods: one registry, from which the engine, the CLI's choices, the callback's refusals and the docs'
method table are derived. A new method is one entry in :data:`METHODS`, one function, and its name in
:data:`Method` (written out for mypy; a test holds it equal to the registry's names).

Every method weights the target layer's channels A^k into ReLU(sum_k w_k A^k) and differs only in where the
weights come from (``MethodSpec.needs``); the score they explain (a class logit, or an embedding's dot product
with a proxy) is the caller's, so every method explains an embedding net as it explains a classifier.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cubcam.cams import gradient_free

Method = Literal["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "scorecam", "ablationcam", "eigencam"]
# What a method's weights are made from, and so what its ``weigh`` takes:
# - "gradients": (activations [B, K, h, w], the score's gradient to them) -> the weighted activations [B, K, h, w],
#   which gradient_map turns into the raw map [B, h, w];
# - "image forwards": gradient_free.score_cam's arguments: a forward of the whole model per (image, channel);
# - "layer forwards": gradient_free.ablation_cam's arguments: a forward above the layer per (image, channel);
# - "nothing": (activations) -> raw map: no score at all.
Needs = Literal["gradients", "image forwards", "layer forwards", "nothing"]
GRADCAM_PP_EPS = 1e-6  # pytorch-grad-cam's, in the alpha denominator
XGRADCAM_EPS = 1e-7  # pytorch-grad-cam's, in the normalising sum


def gradcam(a: Tensor, g: Tensor) -> Tensor:
    """w_k = mean_ij g^k_ij."""
    return g.mean(dim=(2, 3), keepdim=True) * a


def gradcam_pp(a: Tensor, g: Tensor) -> Tensor:
    """w_k = sum_ij alpha^k_ij ReLU(g^k_ij), alpha = g^2 / (2 g^2 + sum_ij(A^k) g^3) where g != 0: the closed form
    for an exponential score, as pytorch-grad-cam computes it."""
    g2, g3 = g.pow(2), g.pow(3)
    alpha = g2 / (2 * g2 + a.sum((2, 3), keepdim=True) * g3 + GRADCAM_PP_EPS)
    weights = (torch.where(g != 0, alpha, torch.zeros_like(alpha)) * torch.relu(g)).sum((2, 3), keepdim=True)
    return weights * a


def hirescam(a: Tensor, g: Tensor) -> Tensor:
    """g^k * A^k: the gradient kept per position."""
    return g * a


def xgradcam(a: Tensor, g: Tensor) -> Tensor:
    """w_k = sum_ij g^k_ij A^k_ij / sum_ij A^k_ij."""
    weights = (g * a).sum((2, 3), keepdim=True) / (a.sum((2, 3), keepdim=True) + XGRADCAM_EPS)
    return weights * a


def layercam(a: Tensor, g: Tensor) -> Tensor:
    """ReLU(g^k) * A^k."""
    return torch.relu(g) * a


@dataclass(frozen=True)
class MethodSpec:
    """One CAM method: its title (as papers and pytorch-grad-cam spell it), its paper, what its weights need, and
    the function that makes its raw map, or a gradient method's weighted activations (its arguments follow
    ``needs``)."""

    title: str
    paper: str
    needs: Needs
    weigh: Callable[..., Tensor]


METHODS: dict[Method, MethodSpec] = {
    "gradcam": MethodSpec("GradCAM", "Selvaraju et al. 2017", "gradients", gradcam),
    "gradcam++": MethodSpec("GradCAM++", "Chattopadhay et al. 2018", "gradients", gradcam_pp),
    "hirescam": MethodSpec("HiResCAM", "Draelos & Carin 2020", "gradients", hirescam),
    "xgradcam": MethodSpec("XGradCAM", "Fu et al. 2020", "gradients", xgradcam),
    "layercam": MethodSpec("LayerCAM", "Jiang et al. 2021", "gradients", layercam),
    "scorecam": MethodSpec("ScoreCAM", "Wang et al. 2020", "image forwards", gradient_free.score_cam),
    "ablationcam": MethodSpec("AblationCAM", "Desai & Ramaswamy 2020", "layer forwards", gradient_free.ablation_cam),
    "eigencam": MethodSpec("EigenCAM", "Muhammad & Yeasin 2020", "nothing", gradient_free.eigen_cam),
}
COSTS: dict[Needs, str] = {  # what one map costs, for the docs' table
    "gradients": "one forward and one backward above the layer",
    "image forwards": "a forward of the whole model per channel",
    "layer forwards": "a forward above the layer per channel",
    "nothing": "one SVD of the layer's activations (no score)",
}


def method_spec(name: str) -> MethodSpec:
    """The registry's entry of ``name``.

    Raises:
        ValueError: an unknown name (the message lists the methods; a model kind names ``kind``).
    """
    if name in ("embeddingcam", "classifier", "embedding"):
        raise ValueError(
            f"{name!r} is a model kind, not a CAM method: the kind comes from the model (pass kind='embedding' "
            f"where it must be forced); method is one of {', '.join(METHODS)}"
        )
    if name not in METHODS:
        raise ValueError(f"CAM method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def methods_needing(*needs: Needs) -> tuple[Method, ...]:
    """The methods whose weights need one of ``needs``, in the registry's order."""
    return tuple(name for name, spec in METHODS.items() if spec.needs in needs)


def weighted_activations(activations: Tensor, grads: Tensor, method: Method = "gradcam") -> Tensor:
    """A gradient method's weighted activations [B, K, h, w] (w_k A^k, or g^k A^k per position) from the layer's
    activations A and the score's gradient g = dy/dA, in float32 (also under autocast)."""
    spec = method_spec(method)
    if spec.needs != "gradients":
        raise ValueError(f"{method} is not made from gradients")
    return spec.weigh(activations.float(), grads.float())


def gradient_map(weighted: Tensor, eigen_smooth: bool = False) -> Tensor:
    """The raw map [B, h, w] of a gradient method's weighted activations: ReLU of their sum over the channels, or
    with ``eigen_smooth`` ReLU of their first principal component (pytorch-grad-cam's ``eigen_smooth``; the sign
    fixed as EigenCAM's, :func:`cubcam.cams.gradient_free.eigen_projection`), which keeps what most channels
    agree on and drops the rest."""
    if eigen_smooth:
        return torch.relu(gradient_free.eigen_projection(weighted))
    return torch.relu(weighted.sum(1))


def methods_table() -> str:
    """The docs' markdown table of the methods, from the registry."""
    rows = [f"| `{name}` | {s.title} | {s.paper} | {COSTS[s.needs]} |" for name, s in METHODS.items()]
    return "\n".join(["| method | name | paper | a map costs |", "|---|---|---|---|", *rows])
