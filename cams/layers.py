"""Which layers of a model give a map: what an error names when the layer it was given gives none.

    map_layers(model, images)   # [("feature_extractor.7", (2, 512, 7, 7)), ...] in the order they ran

One eval-mode forward without autograd, every submodule hooked for that call only (removed in ``finally``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cubcam.cams.engine import eager, eval_mode, looks_channels_last


def map_layers(model: nn.Module, images: Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape) of every submodule whose output is a map [B, K, h, w] larger than 1x1, in the order
    their forwards ended (a container after what it holds: its name is the outermost one of that map). A forward
    that fails part way gives the layers that ran before it failed."""
    seen: list[tuple[str, tuple[int, ...]]] = []

    def record(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            shape = tuple(output.shape) if isinstance(output, Tensor) else ()
            if len(shape) == 4 and shape[-2:] != (1, 1) and not looks_channels_last(shape):
                seen.append((name, shape))

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


def layer_hint(model: nn.Module, images: Tensor) -> str:
    """A sentence naming the layer to explain instead: the last one that gives a map (the one before the
    pooling), or that none does at this image size."""
    layers = map_layers(model, images)
    if not layers:
        size = "x".join(str(side) for side in images.shape[-2:])
        return (
            f"No layer of {type(model).__name__} gives a map larger than 1x1 at {size} px (a model of dense layers "
            f"alone has none; a convolutional one needs larger images)"
        )
    name, shape = layers[-1]
    return f"The last layer that gives a map here is {name!r} {shape}, before the pooling: target_layer={name!r}"
