"""Activation sources: where a validation batch's rows for the CAM panel come from, one interface for either kind
of module, so that the callback holds one flow.

- :class:`StepSource`: a module that speaks the CAM protocol (``cubcam.cams.protocol.CAMModule``): its
  ``validation_step`` returns a ``CAMStepOutput`` with the CAM layer's activations, and maps run through its head
  alone (``HeadExplainer``).
- :class:`LayerSource`: any module, explained at ``target_layer`` (``LayerExplainer``): the features are the
  batch's images, the outputs are those of the loop's own ``self(images)`` (kept by a forward hook), or of one
  forward of ours where ``validation_step`` never calls ``self(images)`` (e.g. it calls ``self.model(x)``); dataset
  indices come from the loader's batch sampler.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast, get_args

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import RandomSampler, default_collate
from torch.utils.hooks import RemovableHandle

from cubcam.callbacks.batches import BatchFormat
from cubcam.callbacks.collect import Collate
from cubcam.cams.engine import OutputSelector, Reshape
from cubcam.cams.layers import layer_hint
from cubcam.cams.methods import Method
from cubcam.cams.overlay import IMAGENET_MEAN, IMAGENET_STD
from cubcam.cams.protocol import CAMModule, CAMStepOutput, Explainer, HeadExplainer, LayerExplainer, check_map
from cubcam.cams.targets import Kind
from cubcam.namespaces import in_both

if TYPE_CHECKING:
    from cubcam.callbacks.options import PanelOptions

STEP_KEYS = tuple(CAMStepOutput.__annotations__)


class BatchRows(NamedTuple):
    """What one validation batch hands the collector: the step output (features under ``activations``), the
    images and the boxes (None: the data has none)."""

    step: CAMStepOutput
    images: Tensor
    boxes: Tensor | None


class ActivationSource(Protocol):
    """Where the callback's rows come from (module doc); ``explainer`` makes the maps of those rows."""

    explainer: Explainer

    def start_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None: ...

    def start_batch(self) -> None: ...

    def rows(self, outputs: Any, batch: Any, batch_idx: int) -> BatchRows: ...

    def check(self, images: Tensor, outputs: Any) -> None: ...

    def end_epoch(self) -> None: ...


class StepSource:
    """A CAM-protocol module: the rows are its ``validation_step``'s ``CAMStepOutput``."""

    def __init__(self, module: CAMModule, fmt: BatchFormat, method: Method = "gradcam"):
        self.explainer: Explainer = HeadExplainer(module)
        self.format, self.method = fmt, method

    def start_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def start_batch(self) -> None:
        pass

    def rows(self, outputs: Any, batch: Any, batch_idx: int) -> BatchRows:
        _check_step(outputs)
        images, _, boxes = self.format.read(batch)
        return BatchRows(cast(CAMStepOutput, outputs), images, boxes)  # its keys are checked above

    def check(self, images: Tensor, outputs: Any) -> None:
        """The step output (where a validation step gave one) and one map of the first image."""
        if outputs is not None:
            _check_step(outputs)
        features, returned = self.explainer.features_and_outputs(images[:1])
        check_map(self.explainer, features, returned, (images.shape[-2], images.shape[-1]), self.method)

    def end_epoch(self) -> None:
        pass


def _check_step(outputs: Any) -> None:
    if not isinstance(outputs, dict) or any(key not in outputs for key in STEP_KEYS):
        raise TypeError(
            f"CAMPanel: validation_step must return a CAMStepOutput dict with keys {STEP_KEYS} "
            f"(the CAM protocol), got {type(outputs).__name__}"
            + (f" with keys {sorted(outputs)}" if isinstance(outputs, dict) else "")
        )


class LayerSource:
    """Any module at ``layer``: the rows are the batch's images, the loop's outputs, the sampler's indices.

    Raises:
        AttributeError: ``layer`` names no submodule (the message names it).
        TypeError: at an epoch's start, a validation loader without a batch sampler or one that shuffles; at a
            batch, one that does not follow the sampler, or a layer that gives no map (naming it).
    """

    def __init__(
        self,
        module: pl.LightningModule,
        layer: str,
        kind: Kind,
        reshape: Reshape | None,
        fmt: BatchFormat,
        output: OutputSelector = None,
        method: Method = "gradcam",
    ):
        self._layer = LayerExplainer(module, layer, kind, reshape, output=output)
        self.method = method
        self.explainer: Explainer = self._layer
        self.module, self.format = module, fmt
        self._seen: list[Tensor] = []  # what the module returned during the current batch
        self._batches: list[list[int]] = []  # dataset indices of each validation batch
        self._hook: RemovableHandle | None = None

    def start_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = val_loader(trainer)
        if loader is None or getattr(loader, "batch_sampler", None) is None:
            raise TypeError("CAMPanel: target_layer needs a validation DataLoader with a batch sampler")
        if isinstance(getattr(loader, "sampler", None), RandomSampler):
            raise TypeError("CAMPanel: the validation loader shuffles; it must keep the dataset's order")
        self._batches = [list(indices) for indices in loader.batch_sampler]
        self.end_epoch()
        self._hook = self.module.register_forward_hook(self._keep)

    def _keep(self, _module: Any, _inputs: Any, returned: Any) -> None:
        # a return that is not what the panel explains is left: the batch's own forward then tells why
        with contextlib.suppress(TypeError, KeyError):
            self._seen.append(self._layer.selected(returned).detach())

    def start_batch(self) -> None:
        # Cleared when a batch starts, not after it: a forward of ours below runs through the hook too, and its
        # output must not be taken for the next batch's.
        self._seen.clear()

    def rows(self, outputs: Any, batch: Any, batch_idx: int) -> BatchRows:
        images, labels, boxes = self.format.read(batch)
        output = next((o for o in reversed(self._seen) if o.dim() == 2 and len(o) == len(images)), None)
        if output is None:  # validation_step did not call self(images): one forward of our own
            try:
                _, output = self._layer.features_and_outputs(images)
            except TypeError as err:
                raise TypeError(f"CAMPanel: {err}") from None
        self._seen.clear()
        index = torch.tensor(self._batches[batch_idx], device=images.device)
        if len(index) != len(images):
            raise TypeError("CAMPanel: the validation batches do not follow the loader's batch sampler")
        step = CAMStepOutput(activations=images, output=output, label=labels.to(images.device), index=index)
        return BatchRows(step, images, boxes)

    def check(self, images: Tensor, outputs: Any) -> None:
        """One forward and one map of the first image; a layer that gives no map is an error that names the layer
        to explain instead (``cubcam.cams.layers.layer_hint``)."""
        try:
            features, returned = self._layer.features_and_outputs(images[:1])
        except TypeError as err:
            raise TypeError(f"CAMPanel: {err}") from None
        try:
            check_map(self._layer, features, returned, (images.shape[-2], images.shape[-1]), self.method)
        except (TypeError, ValueError) as err:
            hint = layer_hint(self.module, images[:1], self._layer.layer_name)
            raise type(err)(f"CAMPanel: {err}" + (f". {hint}" if hint else "")) from None

    def end_epoch(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def activation_source(module: pl.LightningModule, options: PanelOptions) -> ActivationSource:
    """The layer's (``options.target_layer``) or the module's own (the CAM protocol, checked here).

    Raises:
        TypeError: a module that does not speak the CAM protocol and no ``target_layer``.
        ValueError: a ``kind`` that does not fit the module, or ``score`` for an embedding net.
    """
    if options.target_layer is not None:
        chosen: Kind = "classifier" if options.kind == "auto" else options.kind
        if not has_forward(module):
            owner = options.target_layer.split(".")[0]
            raise TypeError(
                f"CAMPanel runs module(images), but {type(module).__name__} has no forward (its steps call a "
                f"submodule); define one that returns the logits or embeddings, e.g. `def forward(self, images): "
                f"return self.{owner}(images)` (a Hugging Face model's ModelOutput too, with CAMPanel(output='logits'))"
            )
        source: ActivationSource = LayerSource(
            module, options.target_layer, chosen, options.reshape, options.format, options.output, options.method
        )
    else:
        kind = getattr(module, "cam_kind", None)
        if kind not in get_args(Kind):
            raise TypeError(
                f"CAMPanel needs target_layer='<dotted layer name>' (e.g. 'net.layer4') for a module that does not "
                f"speak the CAM protocol (cam_kind 'classifier' or 'embedding'); {type(module).__name__} has "
                f"cam_kind={kind!r}"
            )
        for attribute in ("cam_target_layer", "forward_head"):
            if not hasattr(module, attribute):
                raise TypeError(f"CAMPanel: {type(module).__name__} lacks {attribute!r} (the CAM protocol)")
        if options.kind not in ("auto", kind):
            raise ValueError(
                f"CAMPanel: kind={options.kind!r} does not fit a module with cam_kind={kind!r} (use {kind!r} or 'auto')"
            )
        source = StepSource(cast(CAMModule, module), options.format, options.method)  # the protocol, checked above
    if options.score is not None and source.explainer.cam_kind == "embedding":
        raise ValueError("CAMPanel: score= is a classifier's; an embedding net's maps explain its proxies")
    return source


def has_forward(module: pl.LightningModule) -> bool:
    """Whether the module defines ``forward`` (LightningModule's own, in either namespace, is nn.Module's stub)."""
    own = type(module).forward
    return all(own is not getattr(base, "forward", None) for base in in_both(pl.LightningModule))


def val_loader(trainer: pl.Trainer) -> Any:
    """The (first) validation loader, or None."""
    loaders = trainer.val_dataloaders
    return loaders[0] if isinstance(loaders, (list, tuple)) else loaders


def val_collate(trainer: pl.Trainer) -> Collate:
    """The validation loader's ``collate_fn`` (PyTorch's default where it has none)."""
    return getattr(val_loader(trainer), "collate_fn", None) or default_collate


def val_dataset(trainer: pl.Trainer) -> Any:
    """The (first) validation loader's dataset; TypeError where it is not map-style."""
    dataset = getattr(val_loader(trainer), "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError("CAMPanel needs a map-style validation dataset (len() and dataset[i])")
    return dataset


def normalization(dataset: Any, channels: int) -> tuple[list[float], list[float]]:
    """The mean and std the validation images were normalised with, to draw them as the eye saw them: the dataset's
    own ``mean`` / ``std`` (cubcam's), else a torchvision ``Normalize`` in its ``transform`` (``Compose`` too),
    through ``Subset`` wrappers; else ImageNet's for 3 channels and none (images in [0, 1]) for any other count."""
    while dataset is not None:
        mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
        if mean is None:
            mean, std = _normalize_in(getattr(dataset, "transform", None))
        if mean is not None and std is not None:
            return [float(m) for m in mean], [float(s) for s in std]
        dataset = getattr(dataset, "dataset", None)
    return (list(IMAGENET_MEAN), list(IMAGENET_STD)) if channels == 3 else ([0.0], [1.0])


def _normalize_in(transform: Any) -> tuple[Any, Any]:
    """(mean, std) of the first ``Normalize`` in a transform (or a ``Compose`` of them), else (None, None)."""
    for step in getattr(transform, "transforms", None) or [transform]:
        if type(step).__name__ == "Normalize" and hasattr(step, "mean") and hasattr(step, "std"):
            return step.mean, step.std
    return None, None


def class_names(dataset: Any, module: Any) -> list[str]:
    """Names of the validation labels: the dataset's (``class_names``; an ``ImageFolder``'s ``classes``; zero-shot
    splits have their own classes), through ``Subset`` wrappers, else the model's."""
    while dataset is not None:
        names = getattr(dataset, "class_names", None) or getattr(dataset, "classes", None)
        if names:
            return [str(name) for name in names]
        dataset = getattr(dataset, "dataset", None)  # torch.utils.data.Subset and the like
    return list(getattr(module, "class_names", None) or [])
