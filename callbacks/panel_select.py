"""Which validation images the CAM panel shows and which ones its localization metrics use: chosen once, seeded.

Both draw from their own ``torch.Generator``, never from the global RNG, so choosing them neither depends on nor
changes the random stream training uses. A checkpoint keeps them, with the evolution (:func:`saved_choice`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cubcam.callbacks.evolution import Evolution


def spread_over_classes(labels: Sequence[int], num: int, generator: torch.Generator) -> list[int]:
    """``num`` dataset indices spread over as many classes as possible: classes in a random order, one random image
    of each in turn (round robin), so 16 images of a 200-class set show 16 different birds."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    classes = sorted(by_class)
    queues = [
        [by_class[classes[c]][i] for i in torch.randperm(len(by_class[classes[c]]), generator=generator)]
        for c in torch.randperm(len(classes), generator=generator).tolist()
    ]
    chosen: list[int] = []
    for depth in range(max((len(q) for q in queues), default=0)):
        chosen += [q[depth] for q in queues if depth < len(q)]
        if len(chosen) >= num:
            break
    return chosen[:num]


def random_subset(size: int, num: int, generator: torch.Generator) -> list[int]:
    """``min(num, size)`` distinct indices of ``range(size)``, sorted."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    return sorted(torch.randperm(size, generator=generator)[:num].tolist())


def saved_choice(state: Any) -> tuple[list[int] | None, list[int] | None, Evolution]:
    """(panel, subset, evolution) of a CAMPanel state ``{panel, subset, evolution}``; ValueError naming what is wrong
    in one that CAMPanel did not write."""
    if not isinstance(state, dict) or set(state) != {"panel", "subset", "evolution"}:
        got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"expected panel, subset and evolution, got {got}")
    for key in ("panel", "subset"):
        value = state[key]
        if value is not None and not (
            isinstance(value, list) and value and all(isinstance(i, int) and i >= 0 for i in value)
        ):
            raise ValueError(f"{key} must be None or a list of dataset indices")
    evolution = Evolution()
    evolution.load_state_dict(state["evolution"])
    return state["panel"], state["subset"], evolution
