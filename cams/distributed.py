"""Rows of all processes, each dataset image once: what a validation loop's per-image outputs need under DDP.

Pure PyTorch: the collective is passed in (Lightning's ``strategy.all_gather`` or ``LightningModule.all_gather``,
which stack a tensor of every rank into ``[world_size, ...]``), so the module and the callback share this code
without ``cams`` knowing Lightning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

AllGather = Callable[[Tensor], Tensor]  # a tensor [...] of this rank -> [world_size, ...] of all ranks


def gather_rows(all_gather: AllGather, world_size: int, local: Tensor) -> Tensor:
    """All ranks' rows concatenated (ranks may hold different counts: pad to the longest, gather, trim)."""
    if world_size == 1:
        return local
    counts = all_gather(torch.tensor(len(local), device=local.device))
    padded = torch.zeros((int(counts.max()), *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    gathered = all_gather(padded)
    return torch.cat([rows[: int(n)] for rows, n in zip(gathered, counts)])


def gather_unique(all_gather: AllGather, world_size: int, index: Tensor, *columns: Tensor) -> tuple[Tensor, ...]:
    """(index, *columns) of all ranks, sorted by dataset index, each index once (``DistributedSampler`` pads the
    last ranks with repeated images, which must not count twice)."""
    index, order = gather_rows(all_gather, world_size, index).sort(stable=True)
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    return (index[first], *(gather_rows(all_gather, world_size, column)[order][first] for column in columns))
