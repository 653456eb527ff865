"""What a CAM explains: the one thing that differs between GradCAM and EmbeddingCAM.

A target turns a model's outputs into (a) the differentiable score of each image whose gradient weights the map,
and (b) bounded per-class scores, whose argmax is the prediction and which the panels print. Every consumer (the
engine, the callback, ``explain``, ``evaluate``) calls a target instead of branching on the model kind:

- :class:`ClassLogits` (GradCAM): image b scores the logit of its class, ``logits[b, rows[b]]``; the class scores
  are softmax probabilities.
- :class:`Proxies` (EmbeddingCAM, Bachhawat 2024): image b scores ``<y_b, table[rows[b]]>`` against one row of a
  proxy table: the classes' Normalized Mean Proxies, one reference image per class (Single Point Proxy) or one
  neighbour per image. The class scores are cosines to the class proxies, so "predicted" is the nearest class.

One-hot proxies on logits give GradCAM exactly: ``Proxies(torch.eye(C))`` and ``ClassLogits()`` score the same.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

Method = Literal["gradcam", "embeddingcam"]  # the model kind: a classifier's logits or an embedding net's output


class Target(Protocol):
    """What a map explains, given a model's outputs [B, ...]."""

    method: Method
    score_name: str  # what ``class_scores`` holds, for captions: "p" or "cos"

    def score(self, outputs: Tensor, rows: Tensor) -> Tensor:
        """The score [B] of image b for row ``rows[b]`` (a class, or a proxy), differentiable in ``outputs``."""
        ...

    def class_scores(self, outputs: Tensor) -> Tensor:
        """Bounded scores [B, C] of every class; the argmax is the predicted class."""
        ...

    def confidence(self, outputs: Tensor, rows: Tensor) -> Tensor:
        """A positive, bounded score [B] in [0, 1] of row ``rows[b]``: what faithfulness metrics perturb."""
        ...


class ClassLogits:
    """GradCAM's target: the logit of a class."""

    method: Method = "gradcam"
    score_name = "p"

    def score(self, outputs: Tensor, rows: Tensor) -> Tensor:
        if outputs.dim() != 2:
            raise ValueError(f"GradCAM needs logits of shape [B, num_classes], got {tuple(outputs.shape)}")
        rows = check_rows(rows, outputs.shape[0], outputs.shape[1], "targets").to(outputs.device)
        return outputs.gather(1, rows[:, None])[:, 0]

    def class_scores(self, outputs: Tensor) -> Tensor:
        return outputs.float().softmax(1)

    def confidence(self, outputs: Tensor, rows: Tensor) -> Tensor:
        """The softmax probability of the class."""
        rows = check_rows(rows, outputs.shape[0], outputs.shape[1], "targets").to(outputs.device)
        return self.class_scores(outputs).gather(1, rows[:, None])[:, 0]


class Proxies:
    """EmbeddingCAM's target: the dot product of the embedding with a row of ``table`` [N, D].

    ``classes`` [C, D] are the class proxies the prediction is ranked against (default: ``table`` itself); give
    them when the table holds other rows than one per class, e.g. single-point proxies or neighbours.
    """

    method: Method = "embeddingcam"
    score_name = "cos"

    def __init__(self, table: Tensor, classes: Tensor | None = None):
        if table.dim() != 2:
            raise ValueError(f"proxies must be a table [N, D], got shape {tuple(table.shape)}")
        self.table = table
        self.classes = table if classes is None else classes

    def score(self, outputs: Tensor, rows: Tensor) -> Tensor:
        return (outputs * self._proxies(outputs, rows)).sum(1)

    def confidence(self, outputs: Tensor, rows: Tensor) -> Tensor:
        """The cosine to the proxy, clipped at 0 (an embedding pointing away scores nothing, as a probability of 0
        would): bounded where the dot product is not."""
        proxies = self._proxies(outputs, rows).float()
        return F.cosine_similarity(outputs.float(), proxies, dim=1).clamp_min(0)

    def _proxies(self, outputs: Tensor, rows: Tensor) -> Tensor:
        """The proxy of each image, [B, D] on the outputs' device and dtype, after checking shapes and rows."""
        if outputs.dim() != 2:
            raise ValueError(f"EmbeddingCAM needs embeddings of shape [B, D], got {tuple(outputs.shape)}")
        if self.table.shape[1] != outputs.shape[1]:
            raise ValueError(
                f"proxies of dimension {self.table.shape[1]} do not fit embeddings of shape {tuple(outputs.shape)}"
            )
        rows = check_rows(rows, outputs.shape[0], len(self.table), "proxy rows").to(outputs.device)
        return self.table.to(device=outputs.device, dtype=outputs.dtype)[rows]

    def class_scores(self, outputs: Tensor) -> Tensor:
        unit = F.normalize(self.classes.float(), dim=1).to(outputs.device)
        return F.normalize(outputs.float(), dim=1) @ unit.T


def per_image(proxies: Tensor, batch: int) -> tuple[Proxies, Tensor]:
    """One proxy for every image ([D] shared by the batch, or [B, D]) as a target and its rows."""
    if proxies.dim() == 1:
        return Proxies(proxies[None]), torch.zeros(batch, dtype=torch.long, device=proxies.device)
    if proxies.dim() != 2 or proxies.shape[0] != batch:
        raise ValueError(
            f"proxies of shape {tuple(proxies.shape)} do not fit a batch of {batch} images (give [D] or [{batch}, D])"
        )
    return Proxies(proxies), torch.arange(batch, device=proxies.device)


def check_rows(rows: Tensor, batch: int, count: int, name: str) -> Tensor:
    """``rows`` as int64 [batch], each in [0, count): one clear error instead of an index error deep in autograd."""
    rows = torch.as_tensor(rows)
    if rows.shape != (batch,) or rows.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer tensor of shape [{batch}], got {rows.dtype} {tuple(rows.shape)}")
    if rows.numel() and (rows.min() < 0 or rows.max() >= count):
        raise ValueError(f"{name} must lie in [0, {count}), got range [{int(rows.min())}, {int(rows.max())}]")
    return rows.long()
