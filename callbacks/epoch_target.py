"""What a validation epoch's maps explain: the tools' target factory (``cubcam.cams.targets.make_target``) on the
epoch's own outputs.

A classifier's maps explain class logits. An embedding net's proxies exist only once the epoch's embeddings are
all in: the classes' Normalized Mean Proxies over the validation embeddings, one validation image per class
(``single_point_random``), or each image's nearest other validation image (``single_point_nearest``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from cubcam.cams.targets import ExplanationTarget, Method, ProxyScheme, make_target


def epoch_target(
    method: Method,
    proxy: ProxyScheme,
    index: Tensor,
    output: Tensor,
    label: Tensor,
    num_classes: int,
    seed: int = 0,
    score: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> ExplanationTarget:
    """The target of an epoch whose validation images (all ranks', each once) have dataset ``index``, ``output``
    and ``label``; ``seed`` draws ``single_point_random``'s images (a classifier's target ignores them all);
    ``score`` is a classifier's own score function."""
    return make_target(method, proxy, output, label, num_classes, seed=seed, index=index, score=score)
