"""The CAM protocol: what a module offers so that its CAMs need no second backbone pass, the two explainers
(:class:`HeadExplainer` for such a module, :class:`LayerExplainer` for any model at a named layer), and the one
explanation step every consumer (the callback, ``cubcam explain``, ``cubcam evaluate``) runs on an explainer.

A :class:`CAMModule` names its CAM layer (``cam_target_layer``), runs the rest of the net from that layer's output
(``forward_head``: a pool and a linear layer, or a transformer's last block and its head) and says what its output
is (``cam_kind``: a classifier's logits for GradCAM, an embedding for EmbeddingCAM). One backbone forward gives the
activations; every map after that runs through the head alone, so any number of targets or proxies, and
activations kept from a validation loop, cost no further backbone pass. A ``validation_step`` that returns a
:class:`CAMStepOutput` hands the loop's own activations to a callback.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cubcam.cams.engine import (
    CAM,
    DEFAULT_CHANNEL_BATCH,
    OutputSelector,
    Reshape,
    eager,
    eval_mode,
    minmax_normalize,
    select_output,
)
from cubcam.cams.methods import Method, method_spec
from cubcam.cams.proxies import single_point_proxy
from cubcam.cams.targets import (
    FINER_RIVALS,
    ExplanationTarget,
    Kind,
    Proxies,
    Target,
    finer_of,
    finer_rows,
    make_target,
)

Choice = Literal["true", "predicted"]  # which class a map explains
EvalMethod = tuple[ExplanationTarget, Method]  # a method scored side by side: what its maps explain, and how
UNKNOWN_LABEL = -1  # an image without a label (a user's photo) is explained for its predicted class


class CAMModule(Protocol):
    """A module that can be explained from stored activations (see the module doc)."""

    @property
    def cam_kind(self) -> Kind: ...  # a class attribute does: cam_kind = "classifier"

    @property
    def cam_target_layer(self) -> nn.Module: ...

    @property
    def cam_reshape(self) -> Reshape | None: ...  # the layer's output as a map [B, K, h, w]; None: it is one

    def forward_head(self, activations: Tensor) -> Tensor: ...

    def __call__(self, images: Tensor) -> Any: ...  # module(images) -> outputs (an nn.Module's call)

    def modules(self) -> Iterator[nn.Module]: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


class Sample(TypedDict):
    """One image of a CUB-format dataset, as ``dataset[i]`` returns it (batches hold the same keys, stacked)."""

    image: Tensor  # [3, H, W], normalised
    label: int
    box: Tensor  # [4] (x, y, w, h) in the pixels of ``image``
    parts: Tensor  # [P, 3] (x, y, visible)
    image_id: int
    index: int  # position in the dataset


class CAMStepOutput(TypedDict):
    """What a CAM module's ``validation_step`` returns, so that a callback needs no second forward."""

    activations: Tensor  # the CAM layer's output (detached): a map [B, K, h, w], or what cam_reshape makes one of
    output: Tensor  # logits or embeddings [B, ...] (detached)
    label: Tensor  # [B]
    index: Tensor  # [B] dataset positions


def step_output(activations: Tensor, output: Tensor, batch: dict[str, Tensor]) -> CAMStepOutput:
    return CAMStepOutput(
        activations=activations.detach(), output=output.detach(), label=batch["label"], index=batch["index"]
    )


class Explainer(Protocol):
    """What the explanation step runs on: one forward that gives the features maps are made from and the outputs,
    and the maps from those features. Two implementations: :class:`HeadExplainer` (a :class:`CAMModule`: the
    features are the CAM layer's activations, maps run through the head alone) and :class:`LayerExplainer` (any
    model at a layer it names: the features are the images, maps run through the whole model)."""

    @property
    def cam_kind(self) -> Kind: ...

    def features_and_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]: ...

    def outputs(self, images: Tensor) -> Tensor:
        """The model's outputs [B, ...] in eval mode (autograd as the caller has it): what perturbation metrics
        score."""
        ...

    def maps(
        self,
        features: Tensor,
        size: tuple[int, int] | None,
        target: Target,
        rows: Tensor,
        method: Method,
        eigen_smooth: bool = False,
    ) -> Tensor:
        """Maps [B, H, W] in [0, 1] of image b for row ``rows[b]`` of ``target`` (see :func:`head_cams`); with
        ``size=None`` the raw maps at the layer's grid [B, h, w] (float32), which :func:`upsample` finishes.
        ``eigen_smooth``: the engine's (``cubcam.cams.methods.gradient_map``)."""
        ...


class HeadExplainer:
    """A :class:`CAMModule` explained from its CAM layer's activations: any number of maps per backbone pass.
    ``channel_batch_size``: AblationCAM's (image, channel) pairs per head forward."""

    def __init__(self, module: CAMModule, channel_batch_size: int = DEFAULT_CHANNEL_BATCH):
        self.module, self.channel_batch_size = module, channel_batch_size

    @property
    def cam_kind(self) -> Kind:
        return self.module.cam_kind

    def features_and_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return features_and_outputs(self.module, images)

    def outputs(self, images: Tensor) -> Tensor:
        with eval_mode(self.module):
            return self.module(images)

    def maps(
        self,
        features: Tensor,
        size: tuple[int, int] | None,
        target: Target,
        rows: Tensor,
        method: Method,
        eigen_smooth: bool = False,
    ) -> Tensor:
        if method_spec(method).needs == "image forwards":
            raise ValueError(
                f"{method} masks the input images, so its maps cannot be made from the layer's activations: "
                f"explain with explainer_for(module, {method!r}), whose features are the images"
            )
        return head_cams(self.module, features, size, target, rows, method, self.channel_batch_size, eigen_smooth)


class LayerExplainer:
    """Any model explained at a layer it names (e.g. a LightningModule that knows nothing of cubcam).

    Such a model cannot be restarted from stored activations, so its features are the images themselves and every
    map is a forward with the layer hooked and the gradient to that layer: the same maps, a forward and backward
    each.

    Raises:
        AttributeError: ``layer`` names no submodule of ``model`` (the message names the missing part).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        kind: Kind,
        reshape: Reshape | None = None,
        channel_batch_size: int = DEFAULT_CHANNEL_BATCH,
        output: OutputSelector = None,
    ):
        self.model, self.layer_name, self.reshape = model, layer, reshape
        self.channel_batch_size = channel_batch_size  # ScoreCAM's / AblationCAM's (image, channel) pairs per forward
        self.output = output  # picks the tensor from what the model returns (a Hugging Face ModelOutput: "logits")
        self._kind: Kind = kind
        try:
            self.layer: nn.Module = model.get_submodule(layer)
        except AttributeError as err:
            raise AttributeError(f"target_layer {layer!r}: {err}") from None

    @property
    def cam_kind(self) -> Kind:
        return self._kind

    def outputs(self, images: Tensor) -> Tensor:
        """``model(images)`` in eval mode, through ``output``, checked to be logits or embeddings [B, C]."""
        with eval_mode(self.model):
            return self.selected(self.model(images))

    def selected(self, returned: Any) -> Tensor:
        """The logits or embeddings [B, C] in what the model returned (``output`` picks them from a ModelOutput,
        a dict or a tuple); TypeError naming what it got and what to pass."""
        name = type(self.model).__name__
        if self.output is None and not isinstance(returned, Tensor):
            keys = f" (its keys: {', '.join(map(repr, returned.keys()))})" if isinstance(returned, Mapping) else ""
            raise TypeError(
                f"{name}(images) returns a {type(returned).__name__}{keys}, not a tensor: pass output= to pick the "
                f"logits or embeddings from it (output='logits' for a Hugging Face ModelOutput; a key, an index or a "
                f"callable)"
            )
        outputs = select_output(returned, self.output)
        if outputs.dim() != 2:
            raise TypeError(
                f"{name}(images) gives {tuple(outputs.shape)}: the maps explain [B, C] logits (a single logit [B, 1]: "
                f"a binary classifier; a score of your own: CAMPanel's score=) or [B, D] embeddings"
            )
        return outputs

    def features_and_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(the images, the outputs) of one eval-mode forward without autograd."""
        with torch.no_grad():
            return images, self.outputs(images)

    def maps(
        self,
        features: Tensor,
        size: tuple[int, int] | None,
        target: Target,
        rows: Tensor,
        method: Method,
        eigen_smooth: bool = False,
    ) -> Tensor:
        # the features are the images: ScoreCAM masks them as they are
        cam = CAM(
            self.model,
            self.layer,
            output=self.selected,
            method=method,
            reshape=self.reshape,
            layer_name=self.layer_name,
            channel_batch_size=self.channel_batch_size,
        )
        with eval_mode(self.model):
            return _upsampled(cam, features, size, target, rows, next(self.model.parameters()).dtype, eigen_smooth)


def check_map(explainer: Explainer, features: Tensor, outputs: Tensor, size: tuple[int, int], method: Method) -> None:
    """One map of the first image (``features`` and ``outputs`` of ``explainer.features_and_outputs``), explained as
    ``method`` explains it, so that a layer that does not run, or gives no map (and no reshape makes one), fails
    with its error (naming the layer) before any epoch's work is done."""
    output = outputs[:1].detach().float()
    target = make_target(explainer.cam_kind, "normalized_mean", output, torch.zeros(1, dtype=torch.long))
    explain(explainer, features[:1], output, target, size, choice="predicted", method=method)


def explainer_for(
    module: CAMModule, method: Method = "gradcam", channel_batch_size: int = DEFAULT_CHANNEL_BATCH
) -> HeadExplainer | LayerExplainer:
    """The explainer of a CAM module for ``method``: its head alone (:class:`HeadExplainer`), or, for a method
    that masks the input images (``needs == "image forwards"``: ScoreCAM), the whole module at its CAM layer
    (:class:`LayerExplainer`, whose features are the images); ``channel_batch_size`` (image, channel) pairs per
    forward of the methods without gradients."""
    if method_spec(method).needs != "image forwards":
        return HeadExplainer(module, channel_batch_size)
    if not isinstance(module, nn.Module):
        raise TypeError(f"{method} runs the whole module: it must be an nn.Module, got {type(module).__name__}")
    layer = target_layer_name(module)
    if layer is None:
        raise ValueError("the module's cam_target_layer is not one of its submodules")
    return LayerExplainer(module, layer, module.cam_kind, module.cam_reshape, channel_batch_size)


def features_for(explainer: Explainer, activations: Tensor, images: Tensor) -> Tensor:
    """What ``explainer.maps`` takes, given one head forward's CAM-layer ``activations`` of ``images``: those
    activations for a :class:`HeadExplainer`, so that every method shares the forward; the images themselves for a
    :class:`LayerExplainer` (``explainer_for``'s ScoreCAM)."""
    return activations if isinstance(explainer, HeadExplainer) else images


def features_and_outputs(module: CAMModule, images: Tensor) -> tuple[Tensor, Tensor]:
    """One eval-mode forward without autograd: (the target layer's activations, the outputs).

    Every submodule's train/eval flag is restored afterwards (BatchNorm statistics are never updated).
    """
    captured: list[Tensor] = []
    handle = module.cam_target_layer.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        with eval_mode(module), torch.no_grad(), eager():
            outputs = module(images)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the CAM target layer ran {len(captured)} times in one forward; expected once")
    return captured[0], outputs


def head_cams(
    module: CAMModule,
    activations: Tensor,
    size: tuple[int, int] | None,
    target: Target,
    rows: Tensor,
    method: Method = "gradcam",
    channel_batch_size: int = DEFAULT_CHANNEL_BATCH,
    eigen_smooth: bool = False,
) -> Tensor:
    """Maps [B, H, W] in [0, 1] of image b for row ``rows[b]`` of ``target``, from the CAM layer's activations,
    by any method but those that mask the images, ScoreCAM (``channel_batch_size``: AblationCAM's pairs per head
    forward).

    The same maps the engine computes through the whole net: the raw map at the layer's resolution, bilinearly
    upsampled to ``size``, then min-max normalised per image (``size=None``: the raw map, for :func:`upsample`
    elsewhere: the callback sends maps off the device at the layer's grid). Safe inside ``torch.inference_mode`` (as in
    Lightning's validation hooks): it leaves inference mode for the gradient and clones inference tensors.
    """
    cam = CAM(
        module.forward_head,
        None,
        method=method,
        reshape=module.cam_reshape,
        layer_name=target_layer_name(module) or type(module.cam_target_layer).__name__,
        channel_batch_size=channel_batch_size,
    )
    return _upsampled(cam, activations, size, target, rows, next(module.parameters()).dtype, eigen_smooth)


def target_layer_name(module: CAMModule) -> str | None:
    """The dotted name of a CAM module's ``cam_target_layer`` among its submodules; None where it holds no such
    submodule (or is no ``nn.Module``)."""
    if not isinstance(module, nn.Module):
        return None
    return next((name for name, m in module.named_modules() if m is module.cam_target_layer), None)


def _upsampled(
    cam: CAM,
    features: Tensor,
    size: tuple[int, int] | None,
    target: Target,
    rows: Tensor,
    dtype: torch.dtype,
    eigen_smooth: bool = False,
) -> Tensor:
    """The engine's raw maps of ``features`` (cast to the model's ``dtype``: activations kept from a
    mixed-precision loop may be half), outside inference mode and autocast (a map is a sum over many channels:
    float32), then :func:`upsample`d to ``size`` (None: raw)."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(features.device.type, enabled=False):
        raw = cam.explain(
            _normal(features).to(dtype),
            target,
            _normal(rows),
            upsample=False,
            normalize=False,
            eigen_smooth=eigen_smooth,
        )
    return raw.float() if size is None else upsample(raw, size)


def upsample(raw: Tensor, size: tuple[int, int]) -> Tensor:
    """Raw maps [B, h, w] at the layer's grid as the explanation step gives them: bilinearly upsampled to ``size``
    and min-max normalised per image (one definition, wherever the maps are finished)."""
    return minmax_normalize(F.interpolate(raw.float()[:, None], size=size, mode="bilinear", align_corners=False)[:, 0])


@dataclass
class Explanation:
    """The explanation of a batch: a map per image, what it explains, and the prediction."""

    maps: Tensor  # [B, H, W] in [0, 1]; raw at the layer's grid [B, h, w] where the step's size was None
    explained: Tensor  # [B] the class each map explains (``choice``'s)
    rows: Tensor  # [B] the target's row each map explains: the class, or (nearest scheme) the neighbour's row
    predicted: Tensor  # [B] argmax of ``class_scores``
    class_scores: Tensor  # [B, C] softmax probabilities or cosines to the class proxies


def explain(
    explainer: Explainer,
    features: Tensor,
    outputs: Tensor,
    target: ExplanationTarget,
    size: tuple[int, int] | None,
    labels: Tensor | None = None,
    choice: Choice = "true",
    method: Method = "gradcam",
    index: Tensor | None = None,
    eigen_smooth: bool = False,
) -> Explanation:
    """The one explanation step of the callback, ``cubcam explain`` and ``cubcam evaluate``: maps (by
    ``method``) for the true class (``choice="true"``; images whose label is ``UNKNOWN_LABEL`` fall back to the
    predicted class) or the predicted one, through ``target``'s row of each image (``index``: the images' dataset
    indices, so that the nearest-image scheme never picks an image itself), and the prediction."""
    class_scores = target.target.class_scores(outputs)
    predicted = class_scores.argmax(1)
    explained = predicted
    if choice == "true" and labels is not None:
        labels = labels.to(predicted.device)
        explained = torch.where(labels == UNKNOWN_LABEL, predicted, labels)
    rows = target.rows(explained, outputs, index)
    maps = explainer.maps(features, size, target.target, rows.to(features.device), method, eigen_smooth)
    return Explanation(maps, explained, rows, predicted, class_scores)


def finer_maps(
    explainer: Explainer,
    features: Tensor,
    outputs: Tensor,
    target: Target,
    size: tuple[int, int] | None,
    explained: Tensor,
    rivals: int | Tensor = FINER_RIVALS,
    method: Method = "gradcam",
) -> tuple[Tensor, Tensor]:
    """Finer-CAM maps of each image's ``explained`` class against its rivals (:func:`finer_of` ``target``'s
    classes): ``rivals`` nearest ones (an int), or the given ones [B, R] (e.g. the predicted class of a bird the
    model gets wrong). Returns (maps [B, H, W], rows [B, 1 + R]: the class, then its rivals); the same head
    forward as :func:`explain`, one more backward."""
    finer = finer_of(target)
    rows = finer_rows(finer.base.similarities(outputs.float()), explained, rivals)
    return explainer.maps(features, size, finer, rows.to(features.device), method), rows


@dataclass
class PairMaps:
    """The proxy-pair view (Single Point Proxy both ways): each first image's map against its partner's unit
    embedding, each partner's map against the first image's, and their cosine."""

    first: Tensor  # [B, H, W]
    second: Tensor  # [B, H, W]
    cosine: Tensor  # [B]


def pair_maps(
    explainer: Explainer,
    first: tuple[Tensor, Tensor],
    second: tuple[Tensor, Tensor],
    size: tuple[int, int] | None,
    method: Method = "gradcam",
) -> PairMaps:
    """Maps of (features, outputs) pairs explained against each other: the callback's single-point-nearest panel
    (a bird and its nearest other validation image) and ``cubcam explain --query`` (a query and each neighbour)."""
    ours, theirs = (single_point_proxy(outputs) for _, outputs in (first, second))
    rows = torch.arange(len(ours), device=first[0].device)
    return PairMaps(
        explainer.maps(first[0], size, Proxies(theirs), rows, method),
        explainer.maps(second[0], size, Proxies(ours), rows, method),
        (ours * theirs).sum(1),
    )


def _normal(tensor: Tensor) -> Tensor:
    """Autograd cannot save inference tensors for backward: a clone made outside inference mode is a normal one."""
    return tensor.clone() if tensor.is_inference() else tensor
