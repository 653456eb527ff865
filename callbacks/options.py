"""CAMPanel's options, checked once where they are given (``CAMPanel.__init__``): what the panel shows and measures.

One place for the checks and the defaults, so the callback's hooks read settled values; the arguments' meanings are
in ``CAMPanel``'s docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from torch import Tensor

from cubcam.callbacks.batches import CUBCAM_FORMAT, BatchFormat
from cubcam.cams.engine import OutputSelector, Reshape
from cubcam.cams.methods import Method, method_spec
from cubcam.cams.overlay import colorize
from cubcam.cams.protocol import Choice
from cubcam.cams.targets import Kind, ProxyScheme, proxy_scheme
from cubcam.namespaces import in_both

METRIC_PREFIX = "val/cam_"  # the CAM metrics' keys (cubcam.callbacks.epoch_maps.METRIC_KEYS)
CHECKPOINTS = in_both(ModelCheckpoint)
MONITORS = CHECKPOINTS + in_both(EarlyStopping)
KindArg = Literal["auto", Kind]  # "auto": the module's cam_kind
# Finer-CAM in the panel: a third tile for the birds the model gets wrong (their true class against the predicted
# one), one for every bird (its class against its FINER_RIVALS nearest), or none.
FinerMode = Literal["wrong", "every", "off"]
FINER_RIVALS = 3
DEFAULT_METRICS_SUBSET = 512
# With target_layer every subset image costs a forward and a backward each epoch: a smaller default subset.
DEFAULT_LAYER_METRICS_SUBSET = 128


@dataclass
class PanelOptions:
    """CAMPanel's arguments, checked (ValueError naming the argument) and with their defaults filled in."""

    num_images: int = 16
    every_n_epochs: int = 1
    method: Method = "gradcam"
    kind: KindArg = "auto"
    proxy: ProxyScheme = "normalized_mean"
    target: Choice = "true"
    colormap: str = "jet"
    alpha: float = 0.5
    log_metrics: bool = True
    metrics_subset: int | None = None  # None: DEFAULT_METRICS_SUBSET, or DEFAULT_LAYER_METRICS_SUBSET
    seed: int = 0
    target_layer: str | None = None
    reshape: Reshape | None = None
    score: Callable[[Tensor, Tensor], Tensor] | None = None
    format: BatchFormat = CUBCAM_FORMAT
    finer: FinerMode = "wrong"
    aug_smooth: bool = False
    output: OutputSelector = None

    def __post_init__(self) -> None:
        for arg, value in (("num_images", self.num_images), ("every_n_epochs", self.every_n_epochs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CAMPanel: {arg} must be a positive integer, got {value!r}")
        subset = self.metrics_subset
        if subset is not None and (not isinstance(subset, int) or isinstance(subset, bool) or subset < 1):
            raise ValueError(f"CAMPanel: metrics_subset must be None or a positive integer, got {subset!r}")
        for arg, mode, modes in (
            ("kind", self.kind, KindArg),
            ("target", self.target, Choice),
            ("finer", self.finer, FinerMode),
        ):
            if mode not in get_args(modes):  # the Literal types are the one list of the modes
                raise ValueError(f"CAMPanel: {arg} must be one of {get_args(modes)}, got {mode!r}")
        try:
            needs = method_spec(self.method).needs
        except ValueError as err:
            raise ValueError(f"CAMPanel: {err}") from None
        if needs == "image forwards" or (needs == "layer forwards" and self.target_layer is not None):
            raise ValueError(
                f"CAMPanel: method {self.method!r}"
                + (" with target_layer" if needs == "layer forwards" else "")
                + " needs a forward of the whole model per channel and image (K forwards per image for a layer of K "
                "channels), every epoch; use cubcam explain / cubcam evaluate --methods for it, or a cheaper "
                "method here (ablationcam of a CAM module runs its head alone)"
            )
        if self.aug_smooth:
            raise ValueError(
                "CAMPanel: aug_smooth runs the model on six views of every image (mirrored, times 0.9, 1 and 1.1), "
                "every epoch; use cubcam explain --aug-smooth, or GradCAM(...)(images, aug_smooth=True), on a "
                "checkpoint"
            )
        try:
            self.proxy = proxy_scheme(self.proxy)
        except ValueError as err:
            raise ValueError(f"CAMPanel: {err}") from None
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"CAMPanel: alpha must lie in [0, 1], got {self.alpha!r}")
        self.alpha = float(self.alpha)
        colorize(np.zeros(1), self.colormap)  # raises ValueError naming the known colormaps
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"CAMPanel: seed must be an integer, got {self.seed!r}")
        if self.output is not None and self.target_layer is None:
            raise ValueError(
                "CAMPanel: output= picks the tensor from what module(images) returns, with target_layer; a CAM "
                "module's forward_head already returns it"
            )
        if self.metrics_subset is None:
            self.metrics_subset = DEFAULT_METRICS_SUBSET if self.target_layer is None else DEFAULT_LAYER_METRICS_SUBSET


def check_monitors(options: PanelOptions, callbacks: Sequence[Any]) -> None:
    """A ``ModelCheckpoint`` or ``EarlyStopping`` that monitors a CAM metric must find it every epoch it looks:
    otherwise Lightning raises, or burns patience, on an epoch without it (and keeps the stale value in
    ``callback_metrics``). ValueError naming both callbacks where it would not."""
    n = options.every_n_epochs
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None)
        if not isinstance(callback, MONITORS) or not str(monitor).startswith(METRIC_PREFIX):
            continue
        # EarlyStopping looks every validation epoch; ModelCheckpoint every_n_epochs. Private: no public attribute
        # holds it (the one place cubcam reads it).
        own = getattr(callback, "_every_n_epochs", 1) if isinstance(callback, CHECKPOINTS) else 1
        if options.log_metrics and (n == 1 or (own and own % n == 0)):
            continue
        why = "log_metrics=False" if not options.log_metrics else f"every_n_epochs={n}"
        raise ValueError(
            f"{type(callback).__name__}(monitor={monitor!r}) needs the CAM metric every epoch it looks, but "
            f"CAMPanel({why}) logs it {'never' if why == 'log_metrics=False' else f'every {n} epochs'}: monitor "
            f"another key, or give CAMPanel log_metrics=True and every_n_epochs=1"
        )
