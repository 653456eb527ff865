"""GradCAM and EmbeddingCAM: one engine, two scores, every CAM method of :mod:`cubcam.cams.methods`.

For target-layer activations A (shape [B, K, h, w]) and a score y_b per image, the map is
ReLU(sum_k w_k A^k) with w_k = mean_ij dy_b/dA^k_ij (Selvaraju et al., 2017). GradCAM scores a class logit;
EmbeddingCAM (Bachhawat, 2024) scores <embedding, proxy>. Everything else is shared, also the other methods
(``method=``: GradCAM++, HiResCAM, XGradCAM, LayerCAM from the same gradient; ScoreCAM, AblationCAM and EigenCAM
without one, see :mod:`cubcam.cams.gradient_free`). Each needs only a score, so each explains an embedding net's
proxy score as it explains a logit.

Why this engine is safe to call in the middle of training:
- the forward below the target layer runs without autograd (nothing is stored for it), and the backward is one
  ``torch.autograd.grad`` from the score to the captured activation: no layer below it is backpropagated and no
  parameter's ``.grad`` is written;
- the hook exists only for the duration of one call and is removed in ``finally``, also when the call raises;
- the model runs in eval mode (BatchNorm statistics stay as they are, dropout draws no random numbers) and every
  submodule's train/eval flag is restored afterwards.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from types import EllipsisType
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cubcam.cams import gradient_free
from cubcam.cams.methods import Method, gradient_map, method_spec
from cubcam.cams.targets import FINER_RIVALS, ClassLogits, Proxies, Target, finer_of, finer_rows, per_image

DEFAULT_CHANNEL_BATCH = 32  # channels per batched forward of ScoreCAM and AblationCAM (pytorch-grad-cam's 32)
AUG_FACTORS = (1.0, 0.9, 1.1)  # aug_smooth's brightness factors (pytorch-grad-cam's ttach Multiply), plain first
OutputSelector = str | int | Callable[[Any], Tensor] | None
# (model output [N, ...], the image each output row belongs to [N]) -> one score per row [N]. Its first call scores
# the batch as given (rows 0..B-1): a score that picks the predicted class picks it there, once.
ScoreFn = Callable[[Tensor, Tensor], Tensor]
# The target layer's output (e.g. ViT tokens [B, N, D], Swin's NHWC maps) -> a map [B, K, h, w]; applied to the
# activations and to their gradients alike (pytorch-grad-cam's reshape_transform).
Reshape = Callable[[Tensor], Tensor]

_INFERENCE_MODE_HELP = (
    "CAMs need gradients, which torch.inference_mode() forbids. Call it from a block like\n"
    "    with torch.inference_mode(False), torch.enable_grad():\n"
    "        maps = cam(images.clone(), ...)\n"
    "(Lightning runs validation and prediction hooks under inference mode; the clone turns an inference "
    "tensor back into a normal one.)"
)


class CAM:
    """The shared engine: forward with a hook on the target layer, one score per image (from a
    :class:`~cubcam.cams.targets.Target`), gradient to the layer. :class:`GradCAM` and :class:`EmbeddingCAM` are
    this engine with their usual arguments; :meth:`explain` takes any target.
    """

    def __init__(
        self,
        model: Callable[[Tensor], Any],
        target_layer: nn.Module | str | EllipsisType | None = ...,
        output: OutputSelector = None,
        method: Method = "gradcam",
        reshape: Reshape | None = None,
        layer_name: str | None = None,
        *,
        target_layers: Sequence[nn.Module | str] | None = None,
        reshape_transform: Reshape | None = None,
        channel_batch_size: int = DEFAULT_CHANNEL_BATCH,
    ):
        # pytorch-grad-cam's names: target_layers=[layer] (cubcam explains one layer) and reshape_transform=.
        # target_layer has no default: None means "the model is a head", never "forgot the layer".
        if target_layers is not None:
            if target_layer is not ... or len(target_layers) != 1:
                raise ValueError(
                    "cubcam explains one layer: pass target_layer=<the layer> (or target_layers=[<one layer>]), "
                    f"got target_layer={target_layer!r} and {len(target_layers)} target_layers"
                )
            target_layer = target_layers[0]
        if target_layer is ...:
            raise TypeError("pass target_layer: the layer to explain (a module or its dotted name; None: a head)")
        if reshape_transform is not None:
            if reshape is not None:
                raise ValueError("pass reshape= or reshape_transform= (pytorch-grad-cam's name), not both")
            reshape = reshape_transform
        self.spec = method_spec(method)
        if channel_batch_size < 1:
            raise ValueError(f"channel_batch_size must be at least 1, got {channel_batch_size}")
        self.channel_batch_size = channel_batch_size
        self.model = model
        self.output = output
        self.method = method
        self.reshape = reshape
        # What errors call the layer: its dotted name where known.
        self.layer_name = layer_name or (target_layer if isinstance(target_layer, str) else type(target_layer).__name__)
        if isinstance(target_layer, str):
            if not isinstance(model, nn.Module):
                raise TypeError("target_layer given by name needs model to be an nn.Module")
            target_layer = model.get_submodule(target_layer)  # raises AttributeError naming the missing part
        if target_layer is not None and not isinstance(target_layer, nn.Module):
            raise TypeError(
                f"target_layer must be an nn.Module, a dotted module name or None, got {type(target_layer).__name__}"
            )
        if target_layer is None and self.spec.needs == "image forwards":
            raise ValueError(
                f"{method} masks the input images with each channel of the layer, so it needs the whole model and "
                f"its target layer, not a head (target_layer=None)"
            )
        self.target_layer = target_layer
        self.outputs: Tensor | None = None  # the model's output of the images of the last call (pytorch-grad-cam's)

    def __enter__(self) -> CAM:
        """``with GradCAM(model=m, target_layers=[layer]) as cam:``, as pytorch-grad-cam is used. cubcam's hook lives
        for one call only, so there is nothing to release on the way out, and every exception propagates
        (pytorch-grad-cam's ``__exit__`` swallows an ``IndexError``)."""
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def explain(
        self,
        images: Tensor,
        target: Target,
        rows: Tensor,
        *,
        upsample: bool = True,
        normalize: bool = True,
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
    ) -> Tensor:
        """Maps [B, H, W] of image b for row ``rows[b]`` of ``target`` (a class for :class:`ClassLogits`, a proxy
        for :class:`Proxies`); ``aug_smooth`` and ``eigen_smooth`` as :meth:`_smoothed` says."""

        def make_score() -> ScoreFn:
            return lambda output, which: target.score(output, rows.to(which.device)[which])

        return self._smoothed(images, make_score, upsample, normalize, aug_smooth, eigen_smooth)

    def _smoothed(
        self,
        images: Tensor,
        make_score: Callable[[], ScoreFn],
        upsample: bool,
        normalize: bool,
        aug_smooth: bool,
        eigen_smooth: bool,
    ) -> Tensor:
        """The maps, with pytorch-grad-cam's two smoothings. ``eigen_smooth``: a gradient method's map from the first
        principal component of its weighted activations (:func:`~cubcam.cams.methods.gradient_map`).
        ``aug_smooth``: the mean of the maps of six views, the images and their mirror images each times 0.9, 1 and
        1.1 (ttach's ``HorizontalFlip`` and ``Multiply``, as pytorch-grad-cam composes them), each map turned back;
        six passes, each with a fresh score (``make_score``: where it picks the predicted class, each view's)."""
        if not aug_smooth:
            return self._maps(images, make_score(), upsample, normalize, eigen_smooth)
        if self.target_layer is None:
            raise ValueError("aug_smooth flips and scales the images, so it needs the whole model, not a head")
        views = [
            back(self._maps(view, make_score(), upsample, normalize, eigen_smooth)) for view, back in aug_views(images)
        ]
        return torch.stack(views).mean(0)

    def _maps(
        self, images: Tensor, score_fn: ScoreFn, upsample: bool, normalize: bool, eigen_smooth: bool = False
    ) -> Tensor:
        self.outputs = None
        if eigen_smooth and self.spec.needs != "gradients":
            raise ValueError(
                f"eigen_smooth takes the first principal component of a gradient method's weighted activations; "
                f"{self.method} has none (eigencam is that component of the activations themselves)"
            )
        if torch.is_inference_mode_enabled():
            raise RuntimeError(_INFERENCE_MODE_HELP)
        if images.dim() != 4 and (self.target_layer is not None or upsample):
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        if images.is_inference():
            images = images.clone()  # outside inference mode a clone is a normal tensor that autograd accepts
        with eval_mode(self.model):
            if self.spec.needs != "gradients":
                maps = self._gradient_free(images, score_fn)
            else:
                activations, scores = self._forward(images, score_fn)
                with torch.enable_grad():  # the caller may be inside torch.no_grad()
                    (grads,) = torch.autograd.grad(scores.sum(), activations)
                weighted = self.spec.weigh(self._grid(activations.detach()).float(), self._grid(grads).float())
                maps = gradient_map(weighted, eigen_smooth)
        if upsample:
            maps = F.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        if normalize:
            maps = minmax_normalize(maps)
        return maps.to(images.device)

    def _grid(self, tensor: Tensor) -> Tensor:
        """The layer's output (or its gradient) as a map [B, K, h, w], through ``reshape`` when one was given.

        Refused, naming the layer, rather than explained into maps that look fine and mean nothing: no map at all
        (tokens [B, N, D]), a 1x1 grid (a pooled layer: its upsampled map is a constant), and a channels-last map
        [B, h, w, K] (timm's Swin stages; read as channels-first it is K=h channels of an h x K "grid").
        """
        grid = tensor if self.reshape is None else self.reshape(tensor)
        fix = "" if self.reshape is None else " after its reshape"
        if not isinstance(grid, Tensor) or grid.dim() != 4:
            shape = tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
            hint = "" if self.reshape is not None or not isinstance(grid, Tensor) else not_a_map_hint(grid.shape)
            raise TypeError(f"target layer {self.layer_name} gives {shape}{fix}, not a map [B, K, h, w]{hint}")
        shape = tuple(grid.shape)
        if shape[-2:] == (1, 1):
            raise ValueError(
                f"target layer {self.layer_name} gives a 1x1 grid {shape}{fix}: no map to show; pick a layer before "
                f"any pooling (a ResNet's layer4, a ViT's blocks[-1].norm1), or give it larger images (at output "
                f"stride 32 an image needs 64 px or more for a 2x2 grid)"
            )
        if looks_channels_last(shape):
            raise ValueError(
                f"target layer {self.layer_name} gives {shape}{fix}, which looks channels-last [B, h, w, K] (a "
                f"{shape[1]}x{shape[2]} grid of {shape[3]} channels); pass reshape=lambda t: t.permute(0, 3, 1, 2)"
            )
        return grid

    def _forward(self, images: Tensor, score_fn: ScoreFn) -> tuple[Tensor, Tensor]:
        """Run the model; return (activations as a grad leaf, scores [B]) with a graph only above the layer."""
        batch = torch.arange(len(images), device=images.device)
        if self.target_layer is None:  # the model is a head: its input is the activation map
            activations = images.detach().requires_grad_(True)
            with torch.enable_grad():
                return activations, self._score(self.model(activations), score_fn, batch)
        captured: list[Tensor] = []

        def leaf(output: Tensor) -> Tensor:
            self._grid(output)  # fail before the rest of the forward if it is no map (and no reshape makes one)
            captured.append(output.detach().requires_grad_(True))
            torch.set_grad_enabled(True)  # record the graph from here on; the no_grad block restores the mode
            return captured[0]

        scores = self._hooked(images, leaf, lambda output: self._score(output, score_fn, batch))
        return captured[0], scores

    def _hooked(self, images: Tensor, on_layer: Callable[[Tensor], Tensor | None], then: Callable[[Any], Any]) -> Any:
        """``then(model(images))`` under no_grad, with ``on_layer`` called on the target layer's output (what it
        returns replaces that output) by a hook that lives for this call only."""
        assert self.target_layer is not None
        calls = 0

        def hook(module: nn.Module, inputs: Any, output: Any) -> Tensor | None:
            nonlocal calls
            if not isinstance(output, Tensor):
                raise TypeError(f"target layer {self.layer_name} outputs a {type(output).__name__}, not a tensor")
            if calls:
                raise RuntimeError(
                    f"target layer {self.layer_name} ran more than once in one forward; pick a module that runs once"
                )
            calls += 1
            return on_layer(output)

        handle = self.target_layer.register_forward_hook(hook)
        try:
            with torch.no_grad(), eager():
                output = self.model(images)
                if not calls:
                    raise RuntimeError(f"target layer {self.layer_name} did not run during the forward pass")
                return then(output)
        finally:
            handle.remove()

    def _gradient_free(self, images: Tensor, score_fn: ScoreFn) -> Tensor:
        """The raw maps [B, h, w] of a method without gradients (:mod:`cubcam.cams.gradient_free`): no backward at
        all, every forward under no_grad, ``channel_batch_size`` channels per forward."""
        with torch.no_grad():
            if self.target_layer is None:
                layer, output = images, self.model(images)
            else:
                kept: list[Tensor] = []
                layer, output = self._hooked(images, lambda out: kept.append(out), lambda out: (kept[0], out))
            grid = self._grid(layer)
            if self.spec.needs == "nothing":
                return self.spec.weigh(grid)
            batch = torch.arange(len(images), device=images.device)
            scores = self._score(output, score_fn, batch, needs_grad=False)  # also fixes a predicted class
            chunk = self.channel_batch_size
            if self.spec.needs == "image forwards":
                return self.spec.weigh(images, grid, partial(self._scored, score_fn), chunk)
            ablation = gradient_free.Ablation(layer, grid, self.reshape)

            def ablated(image: Tensor, channel: Tensor) -> Tensor:
                layers = ablation.batch(image, channel)
                if self.target_layer is None:  # a head: only the part above the layer runs
                    return self._scored(score_fn, image, layers)
                return self._hooked(  # the layer's output replaced by the ablated copies
                    images[image], lambda _: layers, lambda out: self._score(out, score_fn, image, needs_grad=False)
                )

            return self.spec.weigh(grid, scores, ablated, chunk)

    def _scored(self, score_fn: ScoreFn, which: Tensor, images: Tensor) -> Tensor:
        """The scores of a no-grad forward of ``images``, row r scored as image ``which[r]``."""
        return self._score(self.model(images), score_fn, which, needs_grad=False)

    def _score(self, output: Any, score_fn: ScoreFn, which: Tensor, needs_grad: bool = True) -> Tensor:
        output = select_output(output, self.output)
        if self.outputs is None:  # the first forward of a call is of the images as given
            self.outputs = output.detach()
        scores = score_fn(output, which)
        if needs_grad and not scores.requires_grad:
            raise RuntimeError(
                "the score does not depend on the target layer's activations; "
                "is the target layer part of the forward path?"
            )
        return scores


def aug_views(images: Tensor) -> Iterator[tuple[Tensor, Callable[[Tensor], Tensor]]]:
    """pytorch-grad-cam's ``aug_smooth`` views of ``images`` (ttach's ``HorizontalFlip`` x ``Multiply(0.9, 1,
    1.1)``), the plain view first: (the view, what turns a map of it back)."""
    for flip in (False, True):
        for factor in AUG_FACTORS:
            view = (images.flip(-1) if flip else images) * factor
            yield view, partial(_unflipped, flip=flip)


def _unflipped(maps: Tensor, flip: bool) -> Tensor:
    return maps.flip(-1) if flip else maps


class GradCAM(CAM):
    """GradCAM of a classifier: the score is the target class's logit.

    ``gc(images, targets=None)`` -> maps [B, H, W] in [0, 1]; ``targets=None`` explains the predicted class.
    ``upsample=False, normalize=False`` gives ReLU(sum_k w_k A^k) at the layer's resolution.
    ``target_layer=None`` means the model is a head whose input already is the layer's activation map.
    """

    def __call__(
        self,
        images: Tensor | None = None,
        targets: Tensor | int | Sequence[Any] | None = None,
        *,
        upsample: bool = True,
        normalize: bool = True,
        input_tensor: Tensor | None = None,
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
    ) -> Tensor:
        """``targets``: class indices [B], one class for the whole batch (an int), or None (the predicted classes).
        pytorch-grad-cam's spelling works too: ``input_tensor=`` for the images, a list of its
        ``ClassifierOutputTarget(c)`` (or any object with an int ``category``) for the classes, and its
        ``aug_smooth`` / ``eigen_smooth`` (:meth:`CAM._smoothed`)."""
        if (images is None) == (input_tensor is None):
            raise TypeError("GradCAM needs the images: pass them first (or as input_tensor=, pytorch-grad-cam's name)")
        images = cast(Tensor, images if images is not None else input_tensor)
        target, given = ClassLogits(), class_indices(targets, images.shape[0])

        def make_score() -> ScoreFn:
            classes = given

            def class_score(logits: Tensor, which: Tensor) -> Tensor:
                nonlocal classes
                if classes is None:  # the first call scores the batch as given: its predictions, fixed from then on
                    classes = logits.detach().argmax(1)
                return target.score(logits, classes.to(which.device)[which])

            return class_score

        return self._smoothed(images, make_score, upsample, normalize, aug_smooth, eigen_smooth)


def class_indices(targets: Tensor | int | Sequence[Any] | None, batch: int) -> Tensor | None:
    """Classes [B] from an int (the whole batch), a sequence of ints or of pytorch-grad-cam target objects (their
    ``category``), or a tensor; None stays None (the predicted classes). One target for a batch of several images
    is every image's (pytorch-grad-cam gives images 2..B all-zero maps then).

    Raises:
        ValueError: as many targets as neither 1 nor the images.
    """
    if targets is None:
        return None
    if isinstance(targets, int):
        return torch.full((batch,), targets, dtype=torch.long)
    if isinstance(targets, Tensor):
        classes = targets.reshape(-1)
    else:
        categories = []
        for item in targets:
            category = getattr(item, "category", item)
            if not isinstance(category, int):
                raise TypeError(
                    f"targets must be class indices (a tensor, ints, or targets with an int category such as "
                    f"pytorch-grad-cam's ClassifierOutputTarget); got {type(item).__name__}. For another score of "
                    f"the output use CAM(...).explain with a target of cubcam.cams.targets (ScoreOf for a function)"
                )
            categories.append(category)
        classes = torch.tensor(categories, dtype=torch.long)
    if len(classes) == 1 and batch > 1:
        return classes.expand(batch)
    if len(classes) != batch:
        raise ValueError(
            f"got {len(classes)} targets for {batch} images: give one per image, or one for the whole batch"
        )
    return classes


class EmbeddingCAM(CAM):
    """EmbeddingCAM of an embedding network: the score of image b is <y_b, p_b> for its proxy p_b.

    ``proxies``: [D] (one proxy for the whole batch) or [B, D] (one per image), e.g. from
    :func:`normalized_mean_proxies` or :func:`single_point_proxy`.
    """

    def __call__(
        self,
        images: Tensor,
        proxies: Tensor,
        *,
        upsample: bool = True,
        normalize: bool = True,
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
    ) -> Tensor:
        target, rows = per_image(proxies, images.shape[0])
        smooth = {"aug_smooth": aug_smooth, "eigen_smooth": eigen_smooth}
        return self.explain(images, target, rows, upsample=upsample, normalize=normalize, **smooth)


class FinerCAM(CAM):
    """Finer-CAM (Zhang et al., CVPR 2025): what separates a class from its most similar rivals, by any method of
    the engine that uses the score (``method=``; EigenCAM does not).

    ``FinerCAM(model, layer)(images)`` explains each image's predicted class against its three nearest rivals
    (the classes whose logits lie nearest its own) with ``alpha=1``: ``pytorch_grad_cam.FinerCAM(model,
    [layer])(images)``. For an embedding net give the class proxies: ``FinerCAM(net, layer)(images, proxies=P)``
    explains each image's nearest proxy against the proxies nearest it in ``<y, p>``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.spec.needs == "nothing":
            raise ValueError(f"{self.method} does not use the score, so Finer-CAM has nothing to change in it")

    def __call__(
        self,
        images: Tensor,
        targets: Tensor | int | Sequence[Any] | None = None,
        *,
        rivals: int | Tensor = FINER_RIVALS,
        proxies: Tensor | None = None,
        alpha: float = 1.0,
        temperature: float | None = None,
        upsample: bool = True,
        normalize: bool = True,
    ) -> Tensor:
        """``targets``: the classes (proxy rows) to explain, as :class:`GradCAM` takes them (None: the predicted
        ones). ``rivals``: how many nearest rivals (default 3, pytorch-grad-cam's), or their classes, [R] for the
        whole batch or [B, R]. ``proxies``: class proxies [C, D] of an embedding net (None: the model's output
        is logits). ``alpha`` scales the rivals' scores; ``temperature`` their softmax weights (default 1 for
        logits, ``EMBEDDING_TEMPERATURE`` for proxies: see :func:`~cubcam.cams.targets.finer_of`)."""
        base = ClassLogits() if proxies is None else Proxies(proxies)
        finer = finer_of(base, temperature, alpha)
        classes = class_indices(targets, images.shape[0])
        rows: Tensor | None = None

        def finer_score(output: Tensor, which: Tensor) -> Tensor:
            nonlocal rows
            if rows is None:  # the first call scores the batch as given: its classes and rivals, fixed from then on
                chosen = classes if classes is not None else base.class_scores(output.detach()).argmax(1)
                rows = finer_rows(finer.base.similarities(output.detach()), chosen, rivals)
            return finer.score(output, rows.to(which.device)[which])

        return self._maps(images, finer_score, upsample, normalize)


def looks_channels_last(shape: tuple[int, ...]) -> bool:
    """Whether a [B, d1, d2, d3] map is more plausibly channels-last: read channels-first, its grid d2 x d3 would
    be more than 8 times longer one way than the other, where d1 x d2 would not (image grids are not that thin)."""
    _, d1, d2, d3 = shape
    return max(d2, d3) > 8 * min(d2, d3) and max(d1, d2) <= 8 * min(d1, d2)


def minmax_normalize(maps: Tensor) -> Tensor:
    """Per-map min-max to [0, 1]. A flat map becomes zeros (a ReLU'd map can be empty); a map with a non-finite
    value (a diverged model's) becomes all NaN, checked before the stretch, so that its scores are NaN rather than
    those of whatever the stretch would make of it."""
    low, high = torch.aminmax(maps.flatten(1), dim=1)  # one pass; a NaN propagates into both, an inf into one
    finite = (low.isfinite() & high.isfinite())[:, None, None]
    low, span = low[:, None, None], (high - low)[:, None, None]
    stretched = torch.where(span > 0, (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny), 0.0)
    return torch.where(finite, stretched, float("nan"))


def not_a_map_hint(shape: torch.Size) -> str:
    """What to do with a layer's output that is no map: tokens [B, N, D] folded to their grid (the class token
    dropped where N is one more than a square, as a ViT's), or a vector [B, D] (no spatial layer: the map is
    before it)."""
    if len(shape) == 2:
        return (
            "; it is a vector per image (a dense layer, or after the pooling): there is no map in it; pick a "
            "convolutional or token layer before the pooling"
        )
    if len(shape) != 3:
        return "; pass reshape=... to make it one"
    tokens = shape[1]
    for first, what in ((1, "drop the class token and fold the rest"), (0, "fold the tokens")):
        side = math.isqrt(tokens - first)
        if side * side == tokens - first and side > 1:
            grid, cut = (f"1 + {side}x{side}", "[:, 1:]") if first else (f"{side}x{side}", "")
            return (
                f"; tokens [B, {grid}, D]: {what}: reshape=lambda t: t{cut}.reshape(t.shape[0], {side}, {side}, -1)"
                f".permute(0, 3, 1, 2)"
            )
    return "; pass reshape=... (tokens [B, N, D] to a map [B, D, h, w], without any class or register tokens)"


def select_output(output: Any, selector: OutputSelector) -> Tensor:
    """Pick the tensor to score from a model output that may be a tuple, list or dict."""
    if callable(selector):
        output = selector(output)
    elif selector is not None:
        try:
            output = output[selector]
        except (KeyError, IndexError, TypeError) as err:
            raise KeyError(
                f"output selector {selector!r} does not fit the model output of type {type(output).__name__}"
            ) from err
    if not isinstance(output, Tensor):
        raise TypeError(
            f"the model returned {type(output).__name__}; "
            f"pass output= (a key, an index or a callable) to pick the tensor to explain"
        )
    return output


def eager() -> AbstractContextManager[Any]:
    """``torch.compile``d modules run their Python forward for the block, so that a hook registered for one call
    fires: compiled code does not guard on hooks added after it was compiled (dynamo's
    ``skip_nnmodule_hook_guards``), and would skip them silently. A no-op before torch 2.6 (no ``set_stance``)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else nullcontext()


@contextmanager
def eval_mode(model: object) -> Iterator[None]:
    """Every submodule in eval mode for the block (BatchNorm statistics frozen, no dropout draws), each one's own
    train flag restored afterwards, also when the block raises. A plain callable passes through untouched."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    flags = [m.training for m in modules]
    try:
        for m in modules:
            m.training = False
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


@contextmanager
def isolated(device: torch.device) -> Iterator[None]:
    """Gradients on, inference mode off, and every RNG training uses (torch CPU and ``device``'s CUDA stream,
    Python, NumPy) restored afterwards: what a callback needs to explain in the middle of training unseen."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
