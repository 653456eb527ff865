"""Class proxies for EmbeddingCAM (Bachhawat, 2024): what an embedding is compared with to get a score."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def normalized_mean_proxies(embeddings: Tensor, labels: Tensor, num_classes: int | None = None) -> Tensor:
    """Normalized Mean Proxy of every class: the mean of its L2-normalised embeddings, re-normalised.

    Returns [C, D] with C = ``num_classes`` (default: ``labels.max() + 1``); a class without embeddings gets a
    zero row, so its score, and hence its map, is zero rather than a made-up direction.
    """
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"need embeddings [N, D] and labels [N], got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    labels = labels.long().to(embeddings.device)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 0
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]")
    unit = F.normalize(embeddings.float(), dim=1)
    sums = torch.zeros(num_classes, unit.shape[1], device=unit.device).index_add_(0, labels, unit)
    return F.normalize(sums, dim=1)


def single_point_proxy(embedding: Tensor) -> Tensor:
    """Single Point Proxy: the L2-normalised embedding of one reference image ([D]) or of several ([B, D])."""
    if embedding.dim() not in (1, 2):
        raise ValueError(f"need an embedding [D] or embeddings [B, D], got shape {tuple(embedding.shape)}")
    return F.normalize(embedding.float(), dim=-1)
