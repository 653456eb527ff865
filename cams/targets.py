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

:class:`Finer` (Finer-CAM, Zhang et al. 2025) wraps either: image b scores its row minus its nearest rivals' rows,
so what similar classes share cancels out; its rows are [B, 1 + R] (:func:`finer_rows`).

:func:`make_target` is the one factory every consumer calls: the model kind and a proxy scheme in, an
:class:`ExplanationTarget` (the target, and which of its rows each image explains) out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from cubcam.cams.proxies import normalized_mean_proxies, single_point_proxy

Kind = Literal["classifier", "embedding"]  # the model kind: a classifier's logits or an embedding net's output
# EmbeddingCAM's proxy of an image: its class's Normalized Mean Proxy; one reference image of its class, drawn once
# per class with a seed (Single Point Proxy); or its nearest other reference image (a Single Point Proxy per image).
ProxyScheme = Literal["normalized_mean", "single_point_random", "single_point_nearest"]


class Target(Protocol):
    """What a map explains, given a model's outputs [B, ...]."""

    kind: Kind
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
    """GradCAM's target: the logit of a class.

    A single logit [B, 1] is a binary classifier (one sigmoid output, as in Lightning's transfer-learning example):
    class 1 explains the logit and class 0 its negation, as pytorch-grad-cam's ``BinaryClassifierOutputTarget``
    does; its class scores are ``[1 - sigmoid, sigmoid]``.
    """

    kind: Kind = "classifier"
    score_name = "p"

    def score(self, outputs: Tensor, rows: Tensor) -> Tensor:
        rows = self._rows(outputs, rows)
        if outputs.shape[1] == 1:
            return torch.where(rows == 1, outputs[:, 0], -outputs[:, 0])
        return outputs.gather(1, rows[:, None])[:, 0]

    def class_scores(self, outputs: Tensor) -> Tensor:
        if outputs.dim() == 2 and outputs.shape[1] == 1:
            positive = outputs.float().sigmoid()
            return torch.cat([1 - positive, positive], 1)
        return outputs.float().softmax(1)

    def confidence(self, outputs: Tensor, rows: Tensor) -> Tensor:
        """The probability of the class (softmax; sigmoid for a binary classifier's single logit)."""
        return self.class_scores(outputs).gather(1, self._rows(outputs, rows)[:, None])[:, 0]

    def similarities(self, outputs: Tensor) -> Tensor:
        """Every class's score [B, C] (the logits), which :class:`Finer` ranks and subtracts."""
        if outputs.dim() != 2 or outputs.shape[1] < 2:
            raise ValueError(
                f"Finer-CAM compares a class with its rivals, so it needs logits [B, C] of two or more classes; "
                f"got {tuple(outputs.shape)} (a binary head's single logit has no rival)"
            )
        return outputs

    @staticmethod
    def _rows(outputs: Tensor, rows: Tensor) -> Tensor:
        if outputs.dim() != 2:
            raise ValueError(f"GradCAM needs logits of shape [B, num_classes] or [B, 1], got {tuple(outputs.shape)}")
        classes = 2 if outputs.shape[1] == 1 else outputs.shape[1]
        return check_rows(rows, outputs.shape[0], classes, "targets").to(outputs.device)


class ScoreOf(ClassLogits):
    """A classifier's target with the user's own score ``score(outputs [B, C], classes [B]) -> [B]`` (multi-label
    sigmoid scores, a margin, ...), differentiable in ``outputs``; the class scores and predictions stay those of
    :class:`ClassLogits`."""

    def __init__(self, score: Callable[[Tensor, Tensor], Tensor]):
        self._score = score

    def score(self, outputs: Tensor, rows: Tensor) -> Tensor:
        scores = self._score(outputs, self._rows(outputs, rows))
        if not isinstance(scores, Tensor) or scores.shape != (outputs.shape[0],):
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"a score function must return one score per image [{outputs.shape[0]}], got {shape}")
        return scores


class Proxies:
    """EmbeddingCAM's target: the dot product of the embedding with a row of ``table`` [N, D].

    ``classes`` [C, D] are the class proxies the prediction is ranked against (default: ``table`` itself); give
    them when the table holds other rows than one per class, e.g. single-point proxies or neighbours.
    """

    kind: Kind = "embedding"
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

    def similarities(self, outputs: Tensor) -> Tensor:
        """Every row's score [B, N], ``<y_b, table[n]>``: what :class:`Finer` ranks and subtracts, as a classifier's
        logits."""
        if outputs.dim() != 2 or self.table.shape[1] != outputs.shape[1]:
            raise ValueError(f"proxies of dimension {self.table.shape[1]} do not fit outputs {tuple(outputs.shape)}")
        return outputs @ self.table.to(device=outputs.device, dtype=outputs.dtype).T


class Finer:
    """Finer-CAM's target (Zhang et al., CVPR 2025): image b explains its row's score minus its rivals' scores, so
    that what the rivals share with it cancels out.

    With ``s`` = ``base.similarities(outputs)`` (a classifier's logits; an embedding net's ``<y, p_k>`` with every
    proxy) and ``rows[b]`` = (row c, rivals k_1..k_R), the score is
    ``sum_k w_k (s_c - alpha s_k) / (sum_k w_k + 1e-9)`` with ``w = softmax(s / temperature)`` at the rivals,
    differentiated too: pytorch-grad-cam's ``FinerWeightedTarget`` at temperature 1. One-hot proxies on logits at
    temperature 1 give the classifier's Finer-CAM exactly. Predictions and confidences are the base target's.
    """

    def __init__(self, base: ClassLogits | Proxies, alpha: float = 1.0, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"Finer-CAM's temperature must be positive, got {temperature}")
        self.base, self.alpha, self.temperature = base, alpha, temperature
        self.kind: Kind = base.kind
        self.score_name = base.score_name

    def score(self, outputs: Tensor, rows: Tensor) -> Tensor:
        scores = self.base.similarities(outputs)
        rows = check_finer_rows(rows, scores.shape[0], scores.shape[1]).to(outputs.device)
        target, rival = scores.gather(1, rows[:, :1]), scores.gather(1, rows[:, 1:])
        weights = (scores / self.temperature).softmax(1).gather(1, rows[:, 1:])
        return (weights * (target - self.alpha * rival)).sum(1) / (weights.sum(1) + 1e-9)

    def class_scores(self, outputs: Tensor) -> Tensor:
        return self.base.class_scores(outputs)

    def confidence(self, outputs: Tensor, rows: Tensor) -> Tensor:
        """The base target's confidence in the explained row (``rows[:, 0]``)."""
        return self.base.confidence(outputs, torch.as_tensor(rows)[:, 0])


EMBEDDING_TEMPERATURE = 0.1  # Finer-CAM's softmax temperature over an embedding net's proxy similarities (cosines)
FINER_RIVALS = 3  # Finer-CAM's rivals by default: the classes of ranks 1 to 3 (pytorch-grad-cam's FinerCAM)


def finer_of(target: Target, temperature: float | None = None, alpha: float = 1.0) -> Finer:
    """Finer-CAM over an explanation target's classes, with ``alpha``: a classifier's logits (at temperature 1,
    pytorch-grad-cam's weights), or an embedding net's class proxies (its Normalized Mean Proxies under every scheme)
    at ``EMBEDDING_TEMPERATURE``: its similarities are cosines in [-1, 1], whose plain softmax over many classes would
    weigh every rival alike.

    Raises:
        ValueError: a target with no classes to rank (a table of per-image proxies without class proxies).
    """
    if isinstance(target, Finer):
        return target
    if isinstance(target, ClassLogits):
        return Finer(ClassLogits(), alpha, 1.0 if temperature is None else temperature)
    if isinstance(target, Proxies):
        return Finer(Proxies(target.classes), alpha, EMBEDDING_TEMPERATURE if temperature is None else temperature)
    raise ValueError(
        f"Finer-CAM ranks a classifier's logits or an embedding net's proxies, not {type(target).__name__}"
    )


def finer_rows(similarities: Tensor, rows: Tensor, rivals: int | Tensor = FINER_RIVALS) -> Tensor:
    """[B, 1 + R]: each image's row, then its rivals: given (``rivals`` a tensor, [R] for every image or [B, R]), or
    the ``rivals`` rows whose scores lie nearest it (ranks 1..R of ``|s_k - s_c|``, as pytorch-grad-cam's
    ``FinerCAM`` ranks them), R clamped to the other rows there are.

    Raises:
        ValueError: fewer than two rows (nothing to compare with), or ``rivals`` below 1.
    """
    if similarities.dim() != 2 or similarities.shape[1] < 2:
        raise ValueError(f"Finer-CAM needs scores of two or more classes [B, C], got {tuple(similarities.shape)}")
    rows = check_rows(rows, similarities.shape[0], similarities.shape[1], "targets").to(similarities.device)
    if isinstance(rivals, Tensor):
        given = rivals.to(similarities.device).long()
        given = given.expand(len(rows), -1) if given.dim() == 1 else given.reshape(len(rows), -1)
        return torch.cat([rows[:, None], given], 1)
    if rivals < 1:
        raise ValueError(f"Finer-CAM needs at least one rival, got rivals={rivals}")
    distance = (similarities - similarities.gather(1, rows[:, None])).abs()
    distance = distance.scatter(1, rows[:, None], -1.0)  # the row itself first, whatever ties there are
    return distance.argsort(1)[:, : 1 + min(rivals, similarities.shape[1] - 1)]


def check_finer_rows(rows: Tensor, batch: int, count: int) -> Tensor:
    """``rows`` as int64 [batch, 1 + R] (R >= 1), each in [0, count)."""
    rows = torch.as_tensor(rows)
    if rows.dim() != 2 or rows.shape[0] != batch or rows.shape[1] < 2:
        raise ValueError(
            f"Finer-CAM's rows must be [{batch}, 1 + R]: each image's class, then R >= 1 rivals; got "
            f"{tuple(rows.shape)}"
        )
    return check_rows(rows.flatten(), rows.numel(), count, "Finer-CAM's rows").view(rows.shape)


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


@dataclass(frozen=True)
class ExplanationTarget:
    """What a map explains (``target``) and which of its rows each image explains (:meth:`rows`).

    ``scheme`` is None for a classifier's logits. With ``single_point_nearest`` the target's table is the unit
    reference embeddings ``reference`` [N, D], and ``reference_index`` their dataset indices, so that an image of
    the reference set is never its own neighbour.
    """

    target: Target
    scheme: ProxyScheme | None = None
    reference: Tensor | None = None
    reference_index: Tensor | None = None

    @property
    def neighbours(self) -> bool:
        """Each image explains another image (its nearest reference image), not a class."""
        return self.reference is not None

    def rows(self, classes: Tensor, outputs: Tensor, index: Tensor | None = None) -> Tensor:
        """The row of ``target`` image b's map explains: ``classes[b]``, or (nearest) the row of the most
        cosine-similar reference image other than image b itself (by dataset ``index``)."""
        if self.reference is None:
            return classes
        similarity = F.normalize(outputs.float(), dim=1) @ self.reference.to(outputs.device).T
        if index is not None and self.reference_index is not None:
            own = index.to(outputs.device)[:, None] == self.reference_index.to(outputs.device)[None]
            similarity = similarity.masked_fill(own, -torch.inf)
        return similarity.argmax(1)


def make_target(
    kind: Kind,
    scheme: ProxyScheme = "normalized_mean",
    embeddings: Tensor | None = None,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    index: Tensor | None = None,
    score: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> ExplanationTarget:
    """The explanation target of a model kind: class logits (``classifier``: the other arguments are not needed
    and ignored), or proxies of ``scheme`` built from reference ``embeddings`` [N, D] and their ``labels`` [N]
    (``embedding``; ``index``: their dataset indices, for ``single_point_nearest`` on the set being explained).
    Every scheme predicts the nearest Normalized Mean Proxy's class. ``score``: a classifier's own score function
    (:class:`ScoreOf`). The one place where the two model kinds differ for the callback, ``cubcam explain`` and
    ``cubcam evaluate``.

    Raises:
        ValueError: an unknown kind or scheme, or ``embedding`` without embeddings and labels.
    """
    if kind not in get_args(Kind):
        raise ValueError(f"model kind must be one of {get_args(Kind)}, got {kind!r}")
    if kind == "classifier":
        return ExplanationTarget(ClassLogits() if score is None else ScoreOf(score))
    if scheme not in get_args(ProxyScheme):
        raise ValueError(f"proxy scheme must be one of {get_args(ProxyScheme)}, got {scheme!r}")
    if embeddings is None or labels is None:
        raise ValueError("EmbeddingCAM's proxies need reference embeddings and their labels")
    num_classes = max(num_classes or 0, int(labels.max()) + 1 if labels.numel() else 0)
    mean = normalized_mean_proxies(embeddings, labels, num_classes=num_classes)
    if scheme == "normalized_mean":
        return ExplanationTarget(Proxies(mean), scheme)
    if scheme == "single_point_random":
        return ExplanationTarget(Proxies(single_points(embeddings, labels, num_classes, seed)[0], classes=mean), scheme)
    unit = single_point_proxy(embeddings)
    return ExplanationTarget(Proxies(unit, classes=mean), scheme, reference=unit, reference_index=index)


def single_points(embeddings: Tensor, labels: Tensor, num_classes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Single Point Proxy of every class: the unit embedding of one of its images, drawn once per class with
    ``seed``. Returns (proxies [C, D], the index drawn for each class [C]; -1 and a zero proxy for a class without
    images)."""
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    picks = torch.full((num_classes,), -1, dtype=torch.long)
    for c in range(num_classes):
        members = (labels == c).nonzero()[:, 0]
        if len(members):
            picks[c] = members[torch.randint(len(members), (1,), generator=generator)]
    proxies = torch.zeros(num_classes, embeddings.shape[1])
    has = picks >= 0
    proxies[has] = single_point_proxy(embeddings.cpu()[picks[has]])
    return proxies, picks


def proxy_scheme(name: str) -> ProxyScheme:
    """A proxy scheme by name; ValueError naming the schemes otherwise (the early ``single_point`` named either
    single-point scheme, so it names both)."""
    if name == "single_point":
        raise ValueError(
            "proxy 'single_point' is spelled 'single_point_nearest' (each image's nearest other image) or "
            "'single_point_random' (one image of the class, drawn with the seed)"
        )
    if name not in get_args(ProxyScheme):
        raise ValueError(f"proxy must be one of {get_args(ProxyScheme)}, got {name!r}")
    return cast(ProxyScheme, name)
