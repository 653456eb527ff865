"""The CAM protocol: what a module offers so that its CAMs need no second backbone pass, and the one explanation
step every consumer (the callback, ``cubcam explain``, ``cubcam evaluate``) runs on it.

A :class:`CAMModule` names its CAM layer (``cam_target_layer``), runs the rest of the net from that layer's output
(``forward_head``: a pool and a linear layer, or a transformer's last block and its head) and says what its output
is (``cam_method``: class logits for GradCAM, an embedding for EmbeddingCAM). One backbone forward gives the
activations; every map after that runs through the head alone, so any number of targets or proxies, and
activations kept from a validation loop, cost no further backbone pass. A ``validation_step`` that returns a
:class:`CAMStepOutput` hands the loop's own activations to a callback.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cubcam.cams.engine import CAM, Reshape, Weighting, eval_mode, minmax_normalize
from cubcam.cams.targets import ClassLogits, Method, Proxies, Target

Choice = Literal["true", "predicted"]  # which class a map explains
UNKNOWN_LABEL = -1  # an image without a label (a user's photo) is explained for its predicted class


class CAMModule(Protocol):
    """A module that can be explained from stored activations (see the module doc)."""

    @property
    def cam_method(self) -> Method: ...  # a class attribute does: cam_method = "gradcam"

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


class LayerModule:
    """Any model explained at a layer it names: the CAM protocol for a model without a head of its own (e.g. a
    LightningModule that knows nothing of cubcam).

    Such a model cannot be restarted from stored activations, so its "activations" are the images themselves:
    :func:`features_and_outputs` keeps the images, and :func:`head_cams` runs the engine through the whole model
    (a forward with the layer hooked, the gradient to that layer). Same maps, one forward and backward each.

    Raises:
        AttributeError: ``layer`` names no submodule of ``model`` (the message names the missing part).
    """

    def __init__(self, model: nn.Module, layer: str, method: Method, reshape: Reshape | None = None):
        self.model, self.layer_name = model, layer
        try:
            self.cam_target_layer: nn.Module = model.get_submodule(layer)
        except AttributeError as err:
            raise AttributeError(f"target_layer {layer!r}: {err}") from None
        self.cam_method: Method = method
        self.cam_reshape = reshape
        self.class_names = getattr(model, "class_names", None)

    def forward_head(self, activations: Tensor) -> Tensor:
        raise TypeError(f"{type(self.model).__name__} has no head: its maps run through the whole model")

    def __call__(self, images: Tensor) -> Tensor:
        outputs = self.model(images)
        if not isinstance(outputs, Tensor) or outputs.dim() != 2:
            shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
            raise TypeError(f"{type(self.model).__name__}(images) must return logits or embeddings [B, C], got {shape}")
        return outputs

    def modules(self) -> Iterator[nn.Module]:
        return self.model.modules()

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.model.parameters(recurse)


def check_layer(module: LayerModule, images: Tensor, outputs: Tensor) -> None:
    """One map of the first image, so that a layer that does not run, or gives no map (and no reshape makes one),
    fails with its error (naming the layer) before any epoch's work is done."""
    target: Target = ClassLogits() if module.cam_method == "gradcam" else Proxies(outputs.detach().float())
    rows = outputs.argmax(1) if module.cam_method == "gradcam" else torch.zeros(len(outputs), dtype=torch.long)
    head_cams(module, images, (images.shape[-2], images.shape[-1]), target, rows.to(images.device))


def features_and_outputs(module: CAMModule, images: Tensor) -> tuple[Tensor, Tensor]:
    """One eval-mode forward without autograd: (the target layer's activations, the outputs); for a
    :class:`LayerModule`, (the images, the outputs).

    Every submodule's train/eval flag is restored afterwards (BatchNorm statistics are never updated).
    """
    if isinstance(module, LayerModule):
        with eval_mode(module), torch.no_grad():
            return images, module(images)
    captured: list[Tensor] = []
    handle = module.cam_target_layer.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        with eval_mode(module), torch.no_grad():
            outputs = module(images)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the CAM target layer ran {len(captured)} times in one forward; expected once")
    return captured[0], outputs


def head_cams(
    module: CAMModule,
    activations: Tensor,
    size: tuple[int, int],
    target: Target,
    rows: Tensor,
    weighting: Weighting = "gradcam",
) -> Tensor:
    """Maps [B, H, W] in [0, 1] of image b for row ``rows[b]`` of ``target``, from the CAM layer's activations,
    with any of the engine's gradient weightings.

    The same maps the engine computes through the whole net: the raw map at the layer's resolution, bilinearly
    upsampled to ``size``, then min-max normalised per image. Safe inside ``torch.inference_mode`` (as in
    Lightning's validation hooks): it leaves inference mode for the gradient and clones inference tensors.
    """
    dtype = next(module.parameters()).dtype  # activations kept from a mixed-precision loop may be half
    with torch.inference_mode(False), torch.enable_grad():
        features = _normal(activations).to(dtype)
        if isinstance(module, LayerModule):  # the activations are images: through the whole model
            cam = CAM(module, module.cam_target_layer, weighting=weighting, reshape=module.cam_reshape)
            cam.layer_name = module.layer_name
        else:
            cam = CAM(module.forward_head, None, weighting=weighting, reshape=module.cam_reshape)
        raw = cam.explain(features, target, _normal(rows), upsample=False, normalize=False)
    return minmax_normalize(F.interpolate(raw[:, None], size=size, mode="bilinear", align_corners=False)[:, 0])


@dataclass
class Explanation:
    """The explanation of a batch: a map per image, what it explains, and the prediction."""

    maps: Tensor  # [B, H, W] in [0, 1]
    explained: Tensor  # [B] the class (or proxy row) each map explains
    predicted: Tensor  # [B] argmax of ``class_scores``
    class_scores: Tensor  # [B, C] softmax probabilities or cosines to the class proxies


def explain(
    module: CAMModule,
    activations: Tensor,
    outputs: Tensor,
    target: Target,
    size: tuple[int, int],
    labels: Tensor | None = None,
    choice: Choice = "true",
    weighting: Weighting = "gradcam",
) -> Explanation:
    """The one explanation step: maps (by ``weighting``) for the true class (``choice="true"``; images whose label
    is ``UNKNOWN_LABEL`` fall back to the predicted class) or the predicted one, and the prediction."""
    class_scores = target.class_scores(outputs)
    predicted = class_scores.argmax(1)
    explained = predicted
    if choice == "true" and labels is not None:
        labels = labels.to(predicted.device)
        explained = torch.where(labels == UNKNOWN_LABEL, predicted, labels)
    maps = head_cams(module, activations, size, target, explained, weighting)
    return Explanation(maps, explained, predicted, class_scores)


def _normal(tensor: Tensor) -> Tensor:
    """Autograd cannot save inference tensors for backward: a clone made outside inference mode is a normal one."""
    return tensor.clone() if tensor.is_inference() else tensor
