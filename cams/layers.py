"""Which layers of a model give a map: what an error names when the layer it was given gives none.

    map_layers(model, images)   # [("feature_extractor.7", (2, 512, 7, 7)), ...] in the order they ran

One eval-mode forward without autograd, every submodule hooked for that call only (removed in ``finally``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cubcam.cams.engine import eager, eval_mode, looks_channels_last


def layer_shapes(model: nn.Module, images: Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape) of every submodule that returns a tensor, in the order their forwards ended (a
    container after what it holds). A forward that fails part way gives the layers that ran before it failed."""
    seen: list[tuple[str, tuple[int, ...]]] = []

    def record(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                seen.append((name, tuple(output.shape)))

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    try:
        with eval_mode(model), torch.no_grad(), eager():
            model(images)
    except (RuntimeError, TypeError, ValueError):  # what ran before it is the answer
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


def map_layers(model: nn.Module, images: Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """:func:`layer_shapes` of the layers that give a map [B, K, h, w] larger than 1x1 (the last of a map is the
    outermost module that returns it)."""
    shapes = layer_shapes(model, images)
    return [(n, s) for n, s in shapes if len(s) == 4 and s[-2:] != (1, 1) and not looks_channels_last(s)]


def layer_hint(model: nn.Module, images: Tensor, layer: str) -> str:
    """A sentence naming the layer to explain instead of ``layer``: the last one that gives a map (the one before
    the pooling), or that none does at this image size; empty where ``layer`` gives tokens [B, N, D] (folding
    them, as the engine's error says, is the fix)."""
    shapes = layer_shapes(model, images)
    if any(name == layer and len(shape) == 3 for name, shape in shapes):
        return ""
    maps = [(n, s) for n, s in shapes if len(s) == 4 and s[-2:] != (1, 1) and not looks_channels_last(s)]
    if not maps:
        size = "x".join(str(side) for side in images.shape[-2:])
        return (
            f"No layer of {type(model).__name__} gives a map larger than 1x1 at {size} px: a model of dense layers "
            f"alone has none to explain, and a convolutional one needs larger images"
        )
    name, shape = maps[-1]
    return f"The last layer that gives a map here is {name!r} {shape}, before the pooling: target_layer={name!r}"
