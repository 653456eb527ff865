"""CAMPanel: where the model looks on a fixed validation panel, and how well that matches the birds' boxes, every
validation epoch, in W&B or TensorBoard and as a PNG grid.

    trainer = pl.Trainer(callbacks=[CAMPanel(num_images=16)], logger=WandbLogger(project="cubcam"))

What it relies on: either a module that speaks the CAM protocol (``cubcam.cams.protocol.CAMModule``:
``cam_method``, ``cam_target_layer``, ``cam_reshape``, ``forward_head``, and a ``validation_step`` returning a
``CAMStepOutput``; nothing here imports ``cubcam.train``), or, for any other module, ``target_layer=`` (the layer's
dotted name: the callback then runs its own forward and backward through ``cubcam.cams.protocol.LayerExplainer``);
and a map-style validation dataset, read in order (items and batches as ``batches.BatchFormat`` reads them: dicts
with ``image``, ``label``, optional ``box``, or tuples; optionally ``mean``/``std``/``class_names`` attributes).
Class names come from the dataset, else from the module's ``class_names``.

The work is split into sibling modules, each on ``cubcam.cams`` alone: where a batch's rows come from
(``sources.py``: one interface, the protocol's step outputs or any module through its layer), collecting them
(``collect.py``: gathered from every rank), what the epoch's maps explain (``epoch_target.py``: the tools' target
factory), measuring (``measure.py``: the localization metrics through
``cubcam.cams.localization.LocalizationAccumulator``), rendering (``panel_render.py``), finishing an epoch off the
loop's thread (``deferred.py``), the evolution (``evolution.py``) and logging (``sinks.py``: W&B, TensorBoard, MLflow,
the PNG grid). Every map is the tools' explanation
step (``cubcam.cams.protocol.explain``) on the features and outputs the validation loop already produced for
those birds. Only the epoch that chooses the panel, and the neighbours of ``proxy="single_point_nearest"``, read
images from the dataset and run a forward.

How it stays out of training's way (so the trained weights are bit-identical with and without it):
- Lightning validates under ``torch.inference_mode``; the callback's work runs in ``torch.inference_mode(False)`` with
  gradients enabled, on clones of the inference tensors, and the backward is ``torch.autograd.grad`` to the CAM
  layer's activations only: no ``.grad`` is written, no hook outlives a call;
- its own forwards run with the model in eval mode (BatchNorm statistics untouched) and restore the train flags;
- ``torch.random.fork_rng`` (CPU and the module's CUDA device) and saved Python/NumPy RNG states hide anything it
  draws from the random stream training uses; the panel and the metric subset come from its own seeded generator.

Localization metrics (``val/cam_max_box_acc`` = MaxBoxAccV2, ``val/cam_box_acc_iou50``, ``val/cam_heatmap_ratio``,
``val/cam_pointing_game``: the map's peak inside the GT box) are computed over a fixed, seeded subset of the
validation set (``metrics_subset``, default 512 images or all when fewer), from the features the validation
loop already produced (head-only CAMs: no second backbone pass). A subset because (1) an embedding net's proxies
exist only once the epoch's embeddings are all in, so the features must be kept until the epoch ends, and a whole
CUB-sized split's activation maps would not fit in memory; (2) MaxBoxAccV2 labels connected regions at 100
thresholds per image, which over a whole split would cost a large share of an epoch.
The subset's CAMs are for the true class (classifier; the WSOL convention) or its proxy (embedding net).

What the loop waits for (README, "What runs where"): at a validation epoch's end only the collectives and the
head-only maps at the layer's grid, on the module's device. Upsampling, the box metrics (in worker processes),
rendering, encoding and the thread-safe sinks run on a background thread while the next epoch trains; what only
the loop's thread may do (W&B's log call, the metrics through each logger's ``log_metrics`` at the epoch's own
step) happens at its next hook. ``synchronous=True`` does it all at the epoch's end and logs the metrics with
``LightningModule.log`` (``trainer.callback_metrics``).

The panel row in W&B carries ``epoch`` and sits at the step of the epoch's ``val/*`` metrics. The PNG grid goes to
``<save_dir>/<name>/<version>/cam_panels/epoch_NNN.png`` of the first logger, i.e. beside Lightning's
``checkpoints/`` folder (for W&B: ``<save_dir>/<project>/<run id>/``), or ``<default_root_dir>/cam_panels/``
without a logger. Writing or logging that fails is a warning, never an error.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from cubcam.callbacks.batches import BatchFormat
from cubcam.callbacks.collect import EpochCollector, Outputs, load_birds
from cubcam.callbacks.deferred import EpochWork, Finished, Layout, Worker, finish
from cubcam.callbacks.epoch_target import epoch_target
from cubcam.callbacks.evolution import Evolution
from cubcam.callbacks.measure import METRIC_KEYS, subset_maps
from cubcam.callbacks.panel_render import Style, class_inputs, neighbour_inputs
from cubcam.callbacks.panel_select import random_subset, spread_over_classes
from cubcam.callbacks.sinks import PanelSink, metrics_step, png_folder, sink_factories, unserved_loggers
from cubcam.callbacks.sources import ActivationSource, LayerSource, StepSource
from cubcam.cams.engine import NEEDS_IMAGES, Reshape, Weighting, isolated
from cubcam.cams.labelling import ScorePool, cores, pays_off
from cubcam.cams.overlay import IMAGENET_MEAN, IMAGENET_STD, colorize
from cubcam.cams.protocol import CAMModule, Choice, Explainer
from cubcam.cams.targets import LEGACY_SINGLE_POINT, ExplanationTarget, Method, ProxyScheme, proxy_scheme
from cubcam.namespaces import dual

MethodArg = Literal["auto", "gradcam", "embeddingcam"]  # "auto": the module's cam_method
DEFAULT_METRICS_SUBSET = 512
# With target_layer every subset image costs a forward and a backward each epoch: a smaller default subset
# (bench/callback_overhead.py, README).
DEFAULT_LAYER_METRICS_SUBSET = 128
CAM_BOX_THRESHOLD = 0.5  # where the panel's CAM box is cut until the metrics find the best IoU-0.5 threshold
# of state_dict's layout; 1 (no "version"): panel, subset, evolution under the old state key; 3 adds "pending"
STATE_VERSION = 3
# In a checkpoint folder: the epochs logged after checkpoints there were written with them pending (a line each).
LEDGER = "campanel_logged.txt"
NO_OUTPUTS = Outputs(torch.zeros(0, dtype=torch.long), torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))


class CAMPanelWarning(UserWarning):
    """A panel could not be rendered, logged or written; training goes on."""


if TYPE_CHECKING:  # the hooks are typed with pytorch_lightning's classes; lightning.pytorch's are the same code
    _Callback = pl.Callback
else:
    _Callback = dual(pl.Callback)  # a callback to both Lightning namespaces' Trainer and LightningCLI


class CAMPanel(_Callback):
    """GradCAM (classifiers) / EmbeddingCAM (embedding nets) heatmaps of a fixed validation panel every
    ``every_n_epochs`` validation epochs, logged as one ``wandb.Image`` list under ``val/cam_panel`` (with the
    GT and CAM boxes as W&B box groups) and written as a PNG grid; plus CAM localization metrics (see module doc).

    Args:
        num_images: birds in the panel, spread over as many classes as possible.
        every_n_epochs: render and measure every n-th validation epoch (never during the sanity check).
        method: the model kind, "auto" (the module's ``cam_method``), "gradcam" or "embeddingcam" (must fit).
        proxy: EmbeddingCAM's proxy (``cubcam.cams.targets.ProxyScheme``), from the epoch's validation embeddings:
            "normalized_mean" (the class's Normalized Mean Proxy), "single_point_random" (one validation image of
            the class, drawn with ``seed``) or "single_point_nearest" (the nearest other validation image, shown
            beside the bird). The old "single_point" means "single_point_nearest" (deprecated).
        target: the class of the primary map: "true" or "predicted"; the other one is shown too when it differs.
        colormap, alpha: the heatmap overlay (``cubcam.cams.overlay``).
        log_metrics: compute and log the localization metrics.
        metrics_subset: validation images the metrics use (None: 512, or all when fewer; 128 with
            ``target_layer``, where each costs a forward and a backward every epoch).
        seed: seeds the choice of the panel and of the metric subset.
        weighting: how the layer's channels are weighted into the maps, for either model kind: by gradients,
            "gradcam" (default), "gradcam++", "hirescam", "xgradcam" or "layercam"
            (``cubcam.cams.engine.weighted_activations``); or without, "eigencam" (an SVD per image, no score: the
            same map for every class) and "ablationcam" (K head-only forwards per image for K channels: for
            ResNet-50's 2048 channels, about 2048 x (the metric subset + the panel) pooled linear layers an epoch).
            "scorecam", and "ablationcam" with ``target_layer``, need a whole forward per channel and image, which
            no training loop can afford each epoch: they are refused here (``cubcam explain`` and
            ``cubcam evaluate`` run them).
        target_layer: for a module that does not speak the CAM protocol (any LightningModule): the dotted name of
            the layer to explain inside it, e.g. ``"net.layer4"`` or ``"model.stages.3"``. The callback then runs
            its own eval-mode forward and backward on the panel (and the metric subset, when the data has boxes)
            each epoch; the outputs of the validation loop's own ``self(images)`` calls are reused, not recomputed.
            ``method="auto"`` means ``"gradcam"`` there; ``"embeddingcam"`` when ``module(images)`` returns
            embeddings.
        reshape: with ``target_layer``, how that layer's output becomes a map [B, K, h, w] (e.g. ViT tokens; see
            ``cubcam.cams.engine.Reshape``); None when it is one.
        score: a classifier's own score, ``score(outputs [B, C], classes [B]) -> [B]`` (differentiable), for heads
            whose logit of a class is not the score to explain (multi-label sigmoids, a margin). Without it a
            classifier explains the class logit; a single-logit head [B, 1] is binary: class 1 explains the logit,
            class 0 its negation.
        synchronous: finish every panel epoch inside ``on_validation_epoch_end`` and log the CAM metrics with
            ``LightningModule.log``, so that they are in ``trainer.callback_metrics`` for ``EarlyStopping`` or
            ``ModelCheckpoint(monitor="val/cam_max_box_acc")``; training waits for the box metrics and the panel
            (seconds per epoch at CUB's size). By default (False) that work runs on a background thread while the
            next epoch trains, and the metrics go to every logger at their epoch's own step, at most an epoch later
            (and in ``history``).
        image_key, label_key, box_key: where dict batches and dataset items keep the images, the labels and the
            optional boxes (``[x, y, w, h]`` in the image tensor's pixels); tuples are ``(images, labels[, boxes])``.

    Attributes:
        history: the CAM metrics of every epoch this process logged, ``{epoch: {key: value}}``.

    Raises:
        ValueError: an argument out of range, a weighting the loop cannot afford (above), or a ``method`` that
            does not fit the module (at ``setup``).
        TypeError: at ``setup``, a module that does not speak the CAM protocol and no ``target_layer``; at a
            validation batch, a step output that is not a ``CAMStepOutput``, or a batch that ``image_key`` /
            ``label_key`` do not fit; a validation dataset that is not map-style, or a shuffled validation loader.
        AttributeError: at ``setup``, a ``target_layer`` that names no submodule (the message names it).
    """

    def __init__(
        self,
        num_images: int = 16,
        every_n_epochs: int = 1,
        method: MethodArg = "auto",
        proxy: ProxyScheme | Literal["single_point"] = "normalized_mean",
        target: Choice = "true",
        colormap: str = "jet",
        alpha: float = 0.5,
        log_metrics: bool = True,
        metrics_subset: int | None = None,
        seed: int = 0,
        weighting: Weighting = "gradcam",
        target_layer: str | None = None,
        reshape: Reshape | None = None,
        score: Callable[[Tensor, Tensor], Tensor] | None = None,
        synchronous: bool = False,
        image_key: str = "image",
        label_key: str = "label",
        box_key: str = "box",
    ):
        for arg, value in (("num_images", num_images), ("every_n_epochs", every_n_epochs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CAMPanel: {arg} must be a positive integer, got {value!r}")
        if metrics_subset is not None and (not isinstance(metrics_subset, int) or metrics_subset < 1):
            raise ValueError(f"CAMPanel: metrics_subset must be None or a positive integer, got {metrics_subset!r}")
        for arg, mode, modes in (
            ("weighting", weighting, Weighting),
            ("method", method, MethodArg),
            ("target", target, Choice),
        ):
            if mode not in get_args(modes):  # the Literal types are the one list of the modes
                raise ValueError(f"CAMPanel: {arg} must be one of {get_args(modes)}, got {mode!r}")
        if weighting in NEEDS_IMAGES or (weighting == "ablationcam" and target_layer is not None):
            raise ValueError(
                f"CAMPanel: weighting {weighting!r}"
                + (" with target_layer" if weighting not in NEEDS_IMAGES else "")
                + " needs a forward of the whole model per channel and image (K forwards per image for a layer of K "
                "channels), every epoch; use cubcam explain / cubcam evaluate --weightings for it, or a cheaper "
                "weighting here (ablationcam of a CAM module runs its head alone)"
            )
        try:
            scheme = proxy_scheme(proxy, legacy="single_point_nearest")
        except ValueError as err:
            raise ValueError(f"CAMPanel: {err}") from None
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"CAMPanel: alpha must lie in [0, 1], got {alpha!r}")
        colorize(np.zeros(1), colormap)  # raises ValueError naming the known colormaps
        if not isinstance(seed, int):
            raise ValueError(f"CAMPanel: seed must be an integer, got {seed!r}")
        self.num_images, self.every_n_epochs = num_images, every_n_epochs
        self.method, self.proxy, self.target, self.weighting = method, scheme, target, weighting
        self.colormap, self.alpha = colormap, float(alpha)
        self.log_metrics, self.seed = log_metrics, seed
        default_subset = DEFAULT_METRICS_SUBSET if target_layer is None else DEFAULT_LAYER_METRICS_SUBSET
        self.metrics_subset = metrics_subset or default_subset
        self.target_layer, self.reshape, self.score = target_layer, reshape, score
        self.synchronous = bool(synchronous)
        self.format = BatchFormat(image_key, label_key, box_key)
        self._source: ActivationSource | None = None  # made at setup, from the module
        self._told: set[str] = set()  # what a run is told once: no boxes, boxes left out, diverged maps
        # Chosen once and saved in checkpoints (dataset indices):
        self.panel: list[int] | None = None
        self.subset: list[int] | None = None
        self.evolution = Evolution()  # the panel's thumbnails at every panel epoch (saved in checkpoints)
        self._epoch: EpochCollector | None = None  # this validation epoch's rows, while one is collected
        self._sinks: list[PanelSink] | None = None  # made on the first panel of a run
        self._worker = Worker(self._finish)  # finishes each panel epoch off the loop's thread (not synchronous)
        self._pool: ScorePool | None = None  # the box labelling's processes, made at the first panel epoch
        self._restored: list[EpochWork] = []  # a resumed checkpoint's pending epochs, finished when fit starts
        # The CAM metrics of every epoch logged by this process, epoch -> {key: value} (as LearningRateMonitor's
        # ``lrs``): what a script reads after fit, since they reach callback_metrics only when synchronous.
        self.history: dict[int, dict[str, float]] = {}

    # --- checkpoint state ----------------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        # Every option that changes what the panel shows (two such panels in one Trainer keep their own state);
        # not the seed: a run resumed with another seed still shows the birds it showed before.
        return self._generate_state_key(
            num_images=self.num_images,
            method=self.method,
            proxy=self.proxy,
            target=self.target,
            weighting=self.weighting,
            target_layer=self.target_layer,
        )

    @property
    def _state_key_v1(self) -> str:
        """The key of checkpoints written before ``STATE_VERSION`` 2 (it named fewer options)."""
        proxy = LEGACY_SINGLE_POINT if self.proxy == "single_point_nearest" else self.proxy
        return self._generate_state_key(num_images=self.num_images, method=self.method, proxy=proxy)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "panel": self.panel,
            "subset": self.subset,
            "evolution": self.evolution.state_dict(),
            # Epochs handed to the worker and not yet logged: a checkpoint written now finishes them on resume.
            "pending": [*self._restored, *self._worker.pending()],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = migrate_state(state_dict)
        self.panel, self.subset = state["panel"], state["subset"]
        self.evolution.load_state_dict(state["evolution"])
        self._restored = list(state["pending"])

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint written under the old state key: its state is filed under today's key, which Lightning then
        loads (it looks callback state up by ``state_key`` alone, after this hook)."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states and self._state_key_v1 in states:
            states[self.state_key] = states[self._state_key_v1]

    # --- hooks ---------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._sinks, self._told = None, set()
        unserved = unserved_loggers(trainer)
        if unserved and trainer.is_global_zero:
            _warn(
                f"{', '.join(unserved)} cannot show the panels (cubcam logs images to W&B, TensorBoard and MLflow); "
                f"they go to {png_folder(trainer)} as PNG files instead"
            )
        self._source = self._activation_source(pl_module)
        if self.score is not None and self._source.explainer.cam_method == "embeddingcam":
            raise ValueError("CAMPanel: score= is a classifier's; an embedding net's maps explain its proxies")

    def _activation_source(self, pl_module: pl.LightningModule) -> ActivationSource:
        """The layer's (``target_layer``) or the module's own (the CAM protocol, checked here)."""
        if self.target_layer is not None:
            kind: Method = "gradcam" if self.method == "auto" else self.method
            return LayerSource(pl_module, self.target_layer, kind, self.reshape, self.format)
        method = getattr(pl_module, "cam_method", None)
        if method not in get_args(Method):
            raise TypeError(
                f"CAMPanel needs target_layer='<dotted layer name>' (e.g. 'net.layer4') for a module that does not "
                f"speak the CAM protocol (cam_method 'gradcam' or 'embeddingcam'); {type(pl_module).__name__} has "
                f"cam_method={method!r}"
            )
        for attribute in ("cam_target_layer", "forward_head"):
            if not hasattr(pl_module, attribute):
                raise TypeError(f"CAMPanel: {type(pl_module).__name__} lacks {attribute!r} (the CAM protocol)")
        if self.method not in ("auto", method):
            raise ValueError(
                f"CAMPanel: method={self.method!r} does not fit a module with cam_method={method!r} "
                f"(use {method!r} or 'auto')"
            )
        return StepSource(cast(CAMModule, pl_module), self.format)  # the protocol, checked above

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_finished(trainer, self._worker.take())
        self._epoch = None
        if self._source is None or trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        size = len(_val_dataset(trainer))
        if self.panel is not None and max(self.panel) >= size:
            _warn(f"the saved panel does not fit a validation set of {size} images; choosing a new one")
            self.panel = None
        if self.log_metrics and (
            self.subset is None
            or max(self.subset, default=-1) >= size
            or len(self.subset) != min(self.metrics_subset, size)
        ):
            self.subset = random_subset(size, self.metrics_subset, self._generator(1))
        self._source.start_epoch(trainer, pl_module)
        # Outputs only where the epoch needs them: to choose the panel, and an embedding net's proxies.
        keep = self.panel is None or self._source.explainer.cam_method == "embeddingcam"
        self._epoch = EpochCollector(self.panel, (self.subset or []) if self.log_metrics else [], keep)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._epoch is not None and self._source is not None:
            self._source.start_batch()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._epoch is None or self._source is None or dataloader_idx != 0:
            return
        self._epoch.add(*self._source.rows(outputs, batch, batch_idx))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._log_finished(trainer, self._worker.take())  # a glance at the queue's head: microseconds

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A resumed run finishes the epochs its checkpoint left pending, except those its checkpoint folder's
        ledger shows were logged after the checkpoint was written (a run that ended normally, or was killed late):
        neither lost nor logged twice."""
        restored, self._restored = self._restored, []
        if not trainer.is_global_zero or not restored:
            return
        logged = self._ledger_epochs(Path(str(trainer.ckpt_path)).parent / LEDGER) if trainer.ckpt_path else set()
        for work in restored:  # a logged one still gives the evolution its thumbnails
            self._hand_over(trainer, pl_module, {**work, "log": work.get("log", True) and work["epoch"] not in logged})

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Before any checkpoint callback saves on the way out (Lightning calls those last), so that a checkpoint
        # written now holds nothing that was also logged.
        self._drain(trainer)
        self._close()  # Lightning calls no teardown hook after an exception
        if self._source is not None:
            self._source.end_epoch()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._drain(trainer)
        self._close()
        self._restored = []  # a test or validate run's restored state is not this run's to finish
        if self._source is not None:
            self._source.end_epoch()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        collected, self._epoch = self._epoch, None
        if collected is None or self._source is None:
            return
        self._source.end_epoch()
        work = self._epoch_work(trainer, pl_module, collected)  # on every rank (collectives); None off rank zero
        if self.synchronous:
            finished = self._finish(self._ready(trainer, work)) if work is not None else None
            scores = trainer.strategy.broadcast(finished.scores if finished is not None else None, src=0)
            if scores is not None:
                for key, name in METRIC_KEYS.items():
                    pl_module.log(key, float(scores[name]), sync_dist=True)
            if finished is not None:
                self._log_finished(trainer, [finished], loggers=False)
        elif work is not None:
            self._hand_over(trainer, pl_module, work)

    def _hand_over(self, trainer: pl.Trainer, pl_module: pl.LightningModule, work: EpochWork) -> None:
        """``work`` to the worker."""
        self._log_finished(trainer, self._worker.submit(self._ready(trainer, work)))

    def _ready(self, trainer: pl.Trainer, work: EpochWork) -> EpochWork:
        """``work``, with what finishing it needs made here on the loop's thread: the sinks, the labelling processes."""
        self._sinks_of(trainer)
        metrics = work["metrics"]
        if (
            self._pool is None
            and metrics is not None
            and pays_off(len(metrics["slot"]), (work["size"][0], work["size"][1]))
        ):
            self._pool = ScorePool(score_processes(trainer))
            self._pool.start()  # here on the loop's thread (see ScorePool.start)
        return work

    def _epoch_work(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, collected: EpochCollector
    ) -> EpochWork | None:
        """What the epoch leaves for :func:`~cubcam.callbacks.deferred.finish`: the maps at the layer's grid, made
        here on the module's device. Every rank joins its collectives; rank zero alone gets the work."""
        explainer, device = self._source.explainer, pl_module.device  # type: ignore[union-attr]
        with isolated(device):
            # Collectives first, on every rank in the same order.
            outputs = collected.gathered_outputs(trainer, device) or NO_OUTPUTS
            captured = collected.gathered_panel(trainer, device)
            if self.panel is None and len(outputs.index):
                self.panel = self._choose_panel(outputs)
            dataset = _val_dataset(trainer)
            names = _class_names(dataset, pl_module)
            target = epoch_target(
                explainer.cam_method,
                self.proxy,
                outputs.index,
                outputs.output,
                outputs.label,
                len(names),
                self.seed,
                self.score,
            )
            if self.log_metrics and self.subset and not collected.has_boxes:
                self._once(
                    "no boxes",
                    f"the validation data has no {self.format.box_key!r} boxes: the panel is drawn without boxes and "
                    f"the CAM localization metrics are skipped",
                    warn=False,
                )
            invalid = collected.invalid_boxes
            if invalid:
                self._once(
                    "invalid boxes",
                    f"{len(invalid)} validation image(s) have a box that is not finite or has no width or height "
                    f"(dataset indices {invalid[:5]}): left out of the CAM metrics",
                )
            metrics = None
            if self.log_metrics and self.subset and collected.has_boxes:
                metrics = subset_maps(
                    explainer,
                    collected.take_subset_columns(),
                    target,
                    self.weighting,
                    self.subset,
                    device,
                    trainer.strategy.all_gather,
                    trainer.world_size,
                )
                if not len(metrics["slot"]):
                    metrics = None
                    if trainer.is_global_zero:
                        _warn("no image of the metric subset was validated this epoch; CAM metrics skipped")
            if not trainer.is_global_zero:
                return None
            panel: dict[str, Tensor] | None = None
            layout: Layout = "class"
            try:
                panel, layout = self._panel_inputs(trainer, explainer, captured, target)
            except Exception as err:  # a figure must never end a training run
                _warn(f"could not render the panel of epoch {trainer.current_epoch}: {type(err).__name__}: {err}")
        return EpochWork(
            epoch=trainer.current_epoch,
            step=metrics_step(trainer),
            size=list(collected.image_size),
            num_slots=len(self.subset or []),
            metrics=metrics,
            panel=panel,
            layout=layout,
            choice=self.target,
            symbol=target.target.score_name,
            names=names,
            mean=[float(m) for m in getattr(dataset, "mean", IMAGENET_MEAN)],
            std=[float(s) for s in getattr(dataset, "std", IMAGENET_STD)],
            log=True,
        )

    def _finish(self, work: EpochWork) -> Finished:
        """One work finished (the worker's task, or inline when ``synchronous``)."""
        return finish(work, Style(self.colormap, self.alpha, CAM_BOX_THRESHOLD), self._sinks or [], self._pool)

    def _log_finished(self, trainer: pl.Trainer, finished: list[Finished], loggers: bool = True) -> None:
        """On the loop's thread: each finished epoch's warnings, CAM metrics (``loggers``: through every logger's
        ``log_metrics`` at the epoch's own step, with ``epoch``), evolution thumbnails and sink commits."""
        for done in finished:
            for problem in done.problems:
                _warn(problem)
            if done.frame is not None:
                self.evolution.add(done.frame)
            if not done.log:
                continue
            scores = done.scores
            if scores is not None and "non_finite_images" in scores:
                self._once(
                    "diverged",
                    f"training diverged at epoch {done.epoch}: the CAM maps of {scores['non_finite_images']} of "
                    f"{scores['num_images']} metric images are not finite, so the CAM metrics are NaN",
                )
            if scores is not None:
                self.history[done.epoch] = {key: float(scores[name]) for key, name in METRIC_KEYS.items()}
            if scores is not None and loggers:
                row = {**self.history[done.epoch], "epoch": done.epoch}
                for logger in trainer.loggers:
                    try:
                        logger.log_metrics(row, step=done.step)
                    except Exception as err:
                        _warn(
                            f"could not log the CAM metrics of epoch {done.epoch} to {type(logger).__name__}: "
                            f"{type(err).__name__}: {err}"
                        )
            for name, commit in done.commits:
                try:
                    commit()
                except Exception as err:
                    _warn(f"could not log the panel of epoch {done.epoch} to {name}: {type(err).__name__}: {err}")
            self._record_logged(trainer, done.epoch)

    def _record_logged(self, trainer: pl.Trainer, epoch: int) -> None:
        """Append ``epoch`` to the ledger of every local checkpoint folder: the checkpoints written there before
        now hold it as pending, and a resume from one of them must not log it again (fit only)."""
        if trainer.state.fn != "fit":
            return
        for callback in trainer.checkpoint_callbacks:
            folder = getattr(callback, "dirpath", None)
            if folder is None or "://" in str(folder):
                continue
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
                with open(Path(folder) / LEDGER, "a", encoding="utf-8") as ledger:
                    ledger.write(f"{self.state_key}\t{epoch}\n")
            except OSError as err:
                self._once("ledger", f"could not record the logged epoch in {folder}: {err}")

    def _ledger_epochs(self, path: Path) -> set[int]:
        """The epochs this panel (its ``state_key``) logged, by ``path``'s ledger (none where there is no ledger; a
        torn last line is skipped)."""
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return set()
        fields = (line.rpartition("\t") for line in lines)
        return {int(epoch) for key, _, epoch in fields if key == self.state_key and epoch.isdigit()}

    def _close(self) -> None:
        """Join the worker thread and the labelling processes (after a drain nothing is pending)."""
        self._worker.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _drain(self, trainer: pl.Trainer) -> None:
        """Every pending epoch finished and logged, in order."""
        self._log_finished(trainer, self._worker.take(wait=len(self._worker)))

    def _once(self, what: str, message: str, warn: bool = True) -> None:
        """``message`` the first time in a run that ``what`` happens: a warning, or (``warn=False``) an info line."""
        if what in self._told:
            return
        self._told.add(what)
        if warn:
            _warn(message)
        else:
            rank_zero_info(f"CAMPanel: {message}")

    # --- rendering and logging (rank zero) -----------------------------------------------------------------------

    def _generator(self, use: int) -> torch.Generator:
        """A fresh generator per use (0: the panel, 1: the metric subset), so neither choice depends on when or
        whether the other one was made."""
        return torch.Generator().manual_seed(self.seed + use)

    def _choose_panel(self, outputs: Outputs) -> list[int]:
        """Spread over the classes of the images this validation run saw (all ranks'; identical everywhere)."""
        chosen = spread_over_classes(outputs.label.tolist(), self.num_images, self._generator(0))
        return outputs.index[chosen].tolist()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The CAM evolution: every panel epoch of the run (a resumed one's too), to every sink, once the pending
        epochs are in."""
        self._drain(trainer)
        if not trainer.is_global_zero or not len(self.evolution):
            return
        step = metrics_step(trainer)
        for sink in self._sinks_of(trainer):
            try:
                sink.log_evolution(self.evolution, step)
            except Exception as err:
                _warn(f"could not log the CAM evolution to {sink.name}: {type(err).__name__}: {err}")

    def _sinks_of(self, trainer: pl.Trainer) -> list[PanelSink]:
        """The run's sinks, made once; a logger whose sink cannot be made is warned about and left out."""
        if self._sinks is None:
            self._sinks = []
            for name, make in sink_factories(trainer, list(METRIC_KEYS) if self.log_metrics else []):
                try:
                    self._sinks.append(make())
                except Exception as err:
                    _warn(f"cannot log the panel to {name}: {type(err).__name__}: {err}")
        return self._sinks

    def _panel_inputs(
        self,
        trainer: pl.Trainer,
        explainer: Explainer,
        captured: dict[str, Tensor] | None,
        target: ExplanationTarget,
    ) -> tuple[dict[str, Tensor], Layout]:
        """The panel's maps at the layer's grid and what goes with them (``panel_render``'s ``*_inputs``)."""
        if not self.panel:
            raise RuntimeError("no panel was chosen (the validation run saw no images)")
        dataset = _val_dataset(trainer)
        device = trainer.lightning_module.device
        birds: dict[str, Tensor] = (
            dict(captured) if captured is not None else load_birds(dataset, self.panel, explainer, device, self.format)
        )
        if not target.neighbours or target.reference_index is None:
            return class_inputs(explainer, birds, target, self.target, self.weighting), "class"
        rows = target.rows(birds["label"], birds["output"], birds["index"])
        neighbours = load_birds(dataset, target.reference_index[rows.cpu()].tolist(), explainer, device, self.format)
        return neighbour_inputs(explainer, birds, neighbours, self.weighting), "neighbour"


def migrate_state(state: dict[str, Any]) -> dict[str, Any]:
    """Any saved layout as today's (``STATE_VERSION``); the one place a new field gets its default for old
    checkpoints."""
    version = int(state.get("version", 1))
    if version > STATE_VERSION:
        raise ValueError(f"CAMPanel state version {version} is newer than this cubcam's ({STATE_VERSION})")
    return {
        "version": STATE_VERSION,
        "panel": state.get("panel"),
        "subset": state.get("subset"),
        "evolution": state.get("evolution") or {},
        "pending": list(state.get("pending") or []),
    }


def score_processes(trainer: pl.Trainer) -> int:
    """The labelling processes of this rank: its share of the cores less its training loader's workers (the loop's
    own thread mostly waits for the GPU), at least one and at most 8."""
    loaders = getattr(trainer, "train_dataloader", None)  # a loader, or a list or dict of them; None outside fit
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    workers = sum(getattr(loader, "num_workers", 0) for loader in (loaders if isinstance(loaders, list) else [loaders]))
    return max(1, min(8, cores() // max(1, trainer.num_devices) - workers))


def _val_dataset(trainer: pl.Trainer) -> Any:
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError("CAMPanel needs a map-style validation dataset (len() and dataset[i])")
    return dataset


def _class_names(dataset: Any, module: Any) -> list[str]:
    """Names of the validation labels: the dataset's (``class_names``; an ``ImageFolder``'s ``classes``; zero-shot
    splits have their own classes), through ``Subset`` wrappers, else the model's."""
    while dataset is not None:
        names = getattr(dataset, "class_names", None) or getattr(dataset, "classes", None)
        if names:
            return [str(name) for name in names]
        dataset = getattr(dataset, "dataset", None)  # torch.utils.data.Subset and the like
    return list(getattr(module, "class_names", None) or [])


def _warn(message: str) -> None:
    warnings.warn(f"CAMPanel: {message}", CAMPanelWarning, stacklevel=2)
