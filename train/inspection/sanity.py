"""Model-randomisation sanity checks (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

A map that explains the model must change when the model's weights are destroyed. The check re-initialises the
model's blocks, **cascading** from the head down (the head, then also the last block, ..., down to the stem) and
**independently** (one block at a time, the rest trained), recomputes each method's maps of the same images for the
same classes (an embedding net: against the trained model's proxies, as Adebayo et al. keep the class), and
compares them with the trained model's: the Spearman rank correlation of the pixels and SSIM (torchmetrics), the
mean over the images, per step. A method whose rank correlation stays above :data:`SANITY_LEVEL` once every block is
re-initialised fails: its maps show the image (edges, contrast), not what the model learned. Two baselines share
the plot: a Sobel edge map (model-independent: it stays at 1, what failing looks like) and a random map drawn at
the CAM layer's grid anew each step (near 0).

The blocks (:func:`blocks`) are found in any ``nn.Module``, in registration order (the forward order of torchvision
and timm models): a *stage* is an ``nn.Sequential`` or ``nn.ModuleList`` of two or more modules of one class (a
ResNet's ``layer4``, a ViT's ``blocks``); the root, the single child holding parameters of an opened wrapper (a
LightningModule around its net), a stage and a module holding a stage are opened; every other module with
parameters is one block. Parameters a wrapper holds itself (a ViT's class token and position
embedding) belong to no block. Re-initialising a block calls ``reset_parameters`` of every submodule that has one
(the construction-time initialisers: Kaiming-uniform convolutions, BatchNorm to identity with fresh statistics) and
draws any other parameter of it from N(0, 0.02²), with the global RNG forked and seeded per block, so the cascade
and the independent run re-initialise a block identically and the caller's RNG is untouched.

Cost: ``1 + 2 * len(blocks)`` explanations of the images per method, each a forward and backward of the whole
model (the activations change with the weights below the CAM layer), on a copy of the model: the model itself is
never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.functional.regression import spearman_corrcoef

from cubcam.cams import minmax_normalize
from cubcam.cams.engine import DEFAULT_CHANNEL_BATCH
from cubcam.cams.faithfulness import random_maps
from cubcam.cams.protocol import CAMModule, EvalMethod, explain, explainer_for, features_and_outputs, features_for

SANITY_LEVEL = 0.5  # rank correlation with the trained maps above this after the full cascade: the method fails
INIT_STD = 0.02  # parameters without a reset_parameters (timm's LayerScale, a user's nn.Parameter): N(0, 0.02^2)
Mode = Literal["cascade", "independent"]
MODES: tuple[Mode, ...] = get_args(Mode)
SANITY_BASELINES = ("edge", "random")
Similarity = dict[str, list[float]]  # "spearman" / "ssim" -> one mean per step


def _is_stage(module: nn.Module) -> bool:
    children = list(module.children())
    return (
        isinstance(module, nn.Sequential | nn.ModuleList)
        and len(children) >= 2
        and len({type(c) for c in children}) == 1
    )


def blocks(model: nn.Module) -> list[str]:
    """The names of ``model``'s blocks, input first (see the module doc for what a block is)."""
    names: list[str] = []

    def walk(prefix: str, module: nn.Module, top: bool) -> None:
        holders = [c for c in module.children() if any(True for _ in c.parameters())]
        if top or any(_is_stage(m) for m in module.modules()):
            chain = top and len(holders) == 1  # a wrapper of the model: its one child is the model's top too
            for name, child in module.named_children():
                walk(f"{prefix}{name}.", child, chain and child is holders[0])
        elif holders or any(True for _ in module.parameters(recurse=False)):
            names.append(prefix[:-1])

    walk("", model, True)
    return names


def reinitialise(model: nn.Module, name: str, seed: int) -> None:
    """Re-initialise block ``name`` of ``model`` in place, from ``seed`` (the global RNG is forked, not advanced)."""
    block = model.get_submodule(name)
    devices = sorted({p.device.index or 0 for p in block.parameters() if p.device.type == "cuda"})
    covered: set[int] = set()
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for module in block.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
                covered |= {id(p) for p in module.parameters(recurse=False)}
        for parameter in block.parameters():
            if id(parameter) not in covered:
                parameter.normal_(0.0, INIT_STD)


def edge_maps(images: Tensor) -> Tensor:
    """Sobel gradient magnitude of the channel mean, min-max normalised: [B, H, W] (a model-independent map)."""
    grey = images.float().mean(1, keepdim=True)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
    kernels = torch.stack([sobel, sobel.T])[:, None]
    gradients = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    return minmax_normalize(gradients.pow(2).sum(1).sqrt())


def rank_correlation(maps: Tensor, reference: Tensor) -> Tensor:
    """Per image [B]: the Spearman rank correlation of the pixels of ``maps`` and ``reference`` [B, H, W] (ties
    ranked by their mean rank; 0 where one is constant: it ranks nothing)."""
    rank = spearman_corrcoef(maps.flatten(1).T.double(), reference.flatten(1).T.double())
    return torch.nan_to_num(rank.reshape(-1), nan=0.0)


def similarity(maps: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """Per image [B]: :func:`rank_correlation` of ``maps`` and ``reference`` [B, H, W] and their SSIM (data range 1:
    maps in [0, 1])."""
    rank = rank_correlation(maps, reference)
    ssim = cast(  # a tuple only where full images are asked for
        Tensor,
        structural_similarity_index_measure(
            maps[:, None].float(), reference[:, None].float(), data_range=1.0, reduction="none"
        ),
    )
    return rank, ssim.reshape(-1).double()


@dataclass
class SanityResult:
    """The check's curves and the first image's maps (for the figure)."""

    blocks: list[str]  # head first: the order the cascade re-initialises them
    curves: dict[Mode, dict[str, Similarity]]  # mode -> method or baseline -> similarity per block
    first_maps: dict[str, list[Tensor]] = field(default_factory=dict)  # method -> [trained, after each cascade step]
    first_image: Tensor | None = None  # [C, H, W] as the model saw it (normalised), on the CPU

    def failed(self, level: float = SANITY_LEVEL) -> list[str]:
        """The methods (not the baselines) whose rank correlation after the full cascade is above ``level``."""
        cascade = self.curves["cascade"]
        return [n for n, c in cascade.items() if n not in SANITY_BASELINES and c["spearman"][-1] > level]


def sanity_check(
    module: CAMModule,
    images: Tensor,
    labels: Tensor,
    methods: dict[str, EvalMethod],
    seed: int = 0,
    progress: Callable[[], None] | None = None,
    channel_batch_size: int = DEFAULT_CHANNEL_BATCH,
) -> SanityResult:
    """The cascading and independent randomisation checks of every method on ``images`` [B, C, H, W] for their
    ``labels`` [B] (see the module doc). ``progress`` is called after each of the ``2 * len(blocks)`` steps;
    ``channel_batch_size``: the gradient-free methods' (image, channel) pairs per forward.

    Raises:
        ValueError: the module has no block with parameters.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"the sanity check re-initialises an nn.Module's blocks, got {type(module).__name__}")
    names = blocks(module)[::-1]
    if not names:
        raise ValueError(f"{type(module).__name__} has no block with parameters to re-initialise")
    seeds = {name: seed + i for i, name in enumerate(names)}
    size = (images.shape[-2], images.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    grid = layer_grid(module, images)

    edges = edge_maps(images)  # the model's weights never reach it: the same map at every step

    def with_baselines(maps: dict[str, Tensor]) -> dict[str, Tensor]:
        random = random_maps(len(images), grid, size, generator).to(images.device)
        return maps | {"edge": edges, "random": random}

    trained = with_baselines(_maps(module, images, labels, methods, size, channel_batch_size))
    work = copy.deepcopy(module)
    state = {key: value.clone() for key, value in work.state_dict().items()}
    curves: dict[Mode, dict[str, Similarity]] = {m: {n: {"spearman": [], "ssim": []} for n in trained} for m in MODES}
    first = {name: [trained[name][0].cpu()] for name in methods}
    for mode in MODES:
        for step, name in enumerate(names):
            if mode == "independent" or step == 0:  # the cascade keeps what it re-initialised before
                work.load_state_dict(state)
            reinitialise(work, name, seeds[name])
            maps = with_baselines(_maps(work, images, labels, methods, size, channel_batch_size))
            for method, values in maps.items():
                rank, ssim = similarity(values, trained[method])
                curves[mode][method]["spearman"].append(float(rank.mean()))
                curves[mode][method]["ssim"].append(float(ssim.mean()))
                if mode == "cascade" and method in first:
                    first[method].append(values[0].cpu())
            if progress is not None:
                progress()
    return SanityResult(names, curves, first, images[0].detach().cpu())


def layer_grid(module: CAMModule, images: Tensor) -> tuple[int, int]:
    """The CAM layer's grid (h, w) for ``images``: where a random baseline map is drawn."""
    activations, _ = features_and_outputs(module, images[:1])
    reshape = module.cam_reshape
    maps = reshape(activations) if reshape is not None else activations
    return int(maps.shape[-2]), int(maps.shape[-1])


def _maps(
    module: CAMModule,
    images: Tensor,
    labels: Tensor,
    methods: dict[str, EvalMethod],
    size: tuple[int, int],
    channel_batch_size: int,
) -> dict[str, Tensor]:
    """Every method's maps [B, H, W] of ``images`` for ``labels`` (the true classes) from ``module``, all from one
    backbone forward but ScoreCAM's (as ``cubcam evaluate`` makes them)."""
    activations, outputs = features_and_outputs(module, images)
    maps: dict[str, Tensor] = {}
    for name, (target, method) in methods.items():
        explainer = explainer_for(module, method, channel_batch_size)
        features = features_for(explainer, activations, images)
        maps[name] = explain(explainer, features, outputs, target, size, labels, "true", method).maps.float()
    return maps


def sanity_report(result: SanityResult, num_images: int, level: float = SANITY_LEVEL) -> dict[str, object]:
    """What ``metrics.json`` holds under ``sanity``: the blocks (head first), the curves per mode, the level, and
    the methods that fail."""
    return {
        "level": level,
        "num_images": num_images,
        "blocks": result.blocks,
        "cascade": result.curves["cascade"],
        "independent": result.curves["independent"],
        "failed": result.failed(level),
    }


def sanity_table(sanity: dict, name_of: Callable[[str], str]) -> str:
    """The check as a markdown section for ``metrics.md`` (``name_of``: a method key's column title): per method and
    baseline the rank correlation and SSIM after the head alone and after the full cascade, the lowest over the
    independent steps, and the verdict."""
    blocks, level = sanity["blocks"], sanity["level"]
    lines = [
        f"## Sanity check: maps as the blocks are re-initialised (Adebayo et al. 2018), {sanity['num_images']} images",
        "",
        f"Cascading from `{blocks[0]}` down to `{blocks[-1]}`; a method fails where the rank correlation with the "
        f"trained model's maps stays above {level} after the full cascade.",
        "",
        "| method | rank corr., head only | rank corr., all blocks | SSIM, all blocks | lowest rank corr., one block "
        "| verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, curve in sanity["cascade"].items():
        rank, ssim = curve["spearman"], curve["ssim"]
        lowest = min(sanity["independent"][name]["spearman"])
        if name in SANITY_BASELINES:
            verdict = "baseline"
        else:
            verdict = "**fails**: explains the image, not the model" if name in sanity["failed"] else "passes"
        lines.append(
            f"| {name_of(name)} | {rank[0]:.3f} | {rank[-1]:.3f} | {ssim[-1]:.3f} | {lowest:.3f} | {verdict} |"
        )
    return "\n".join(lines) + "\n"
