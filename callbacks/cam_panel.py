"""CAMPanel: where the model looks on a fixed validation panel, and how well that matches the birds' boxes, every
validation epoch, in W&B, TensorBoard or MLflow and as a PNG grid.

    trainer = pl.Trainer(callbacks=[CAMPanel(num_images=16)], logger=WandbLogger(project="cubcam"))

A thin adapter from Lightning's hooks to two plain parts, named by the thread they run on:
``epoch_maps.py`` (the loop's thread, the module's device: the epoch's maps, its box metrics, the evolution's
thumbnails) and ``picture_thread.py`` (one daemon thread: rendering, encoding and the sinks). The rows come from
``sources.py`` (a CAM-protocol module's step outputs, or any module through ``target_layer``) via ``collect.py``.

How it stays out of training's way (so the trained weights are bit-identical with and without it): its work runs
under ``cubcam.cams.engine.isolated`` (gradients on, the RNG forked, the train flags restored), with backwards to
the CAM layer's activations only; the panel and the metric subset come from its own seeded generators.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from cubcam import CubcamWarning
from cubcam.callbacks.batches import BatchFormat
from cubcam.callbacks.collect import EpochCollector, read_items
from cubcam.callbacks.epoch_maps import METRIC_KEYS, Collectives, Epoch, epoch_maps
from cubcam.callbacks.evolution import Evolution
from cubcam.callbacks.options import FinerMode, KindArg, PanelOptions, check_monitors
from cubcam.callbacks.panel_render import Style
from cubcam.callbacks.panel_select import random_subset, saved_choice
from cubcam.callbacks.picture_thread import Drawn, EvolutionJob, PictureThread
from cubcam.callbacks.sinks import PanelSink, make_sinks, metrics_step, png_folder, unserved_loggers
from cubcam.callbacks.sources import (
    ActivationSource,
    activation_source,
    class_names,
    val_collate,
    val_dataset,
    val_loader,
)
from cubcam.cams.engine import OutputSelector, Reshape, isolated
from cubcam.cams.methods import Method
from cubcam.cams.protocol import Choice
from cubcam.cams.targets import ProxyScheme
from cubcam.namespaces import dual

EXIT_WAIT = 2.0  # s: how long a run that ends on an exception waits for its last pictures


class CAMPanelWarning(CubcamWarning):
    """A panel could not be rendered, logged or written; training goes on."""


if TYPE_CHECKING:  # the hooks are typed with pytorch_lightning's classes; lightning.pytorch's are the same code
    _Callback = pl.Callback
else:
    _Callback = dual(pl.Callback)  # a callback to both Lightning namespaces' Trainer and LightningCLI


class CAMPanel(_Callback):
    """GradCAM (classifiers) / EmbeddingCAM (embedding nets) heatmaps of a fixed validation panel every
    ``every_n_epochs`` validation epochs, and their localization metrics.

    The metrics (``val/cam_max_box_acc`` = MaxBoxAccV2, ``val/cam_box_acc_iou50``, ``val/cam_heatmap_ratio``,
    ``val/cam_pointing_game``: the map's peak inside the GT box) are computed at the validation epoch's end on the
    module's device, over a fixed, seeded subset of the validation set, for the true class (the WSOL convention) or
    its proxy, and logged with ``LightningModule.log``: they are in ``trainer.callback_metrics`` and every logger's
    row of the epoch's ``val/*`` metrics, so ``ModelCheckpoint(monitor="val/cam_max_box_acc")`` works. The panel
    (a grid with GT and CAM boxes: a W&B image with box groups and a table, a TensorBoard or MLflow image, and
    ``cam_panels/epoch_NNN.png`` beside the checkpoints) is drawn on a background thread while training goes on;
    the CAM evolution (every panel epoch's thumbnails, saved in checkpoints) is logged at the end of ``fit``.

    Args:
        num_images: birds in the panel, spread over as many classes as possible.
        every_n_epochs: render and measure every n-th validation epoch (never during the sanity check).
        method: the CAM method (``cubcam.cams.methods.METHODS``), for either model kind: from gradients,
            "gradcam" (default), "gradcam++", "hirescam", "xgradcam" or "layercam"; or without, "eigencam" (an SVD
            per image, no score: the same map for every class) and "ablationcam" (K head-only forwards per image for
            K channels: for ResNet-50's 2048 channels, about 2048 x (the metric subset + the panel) pooled linear
            layers an epoch). "scorecam", and "ablationcam" with ``target_layer``, need a whole forward per channel
            and image, which no training loop can afford each epoch: they are refused here (``cubcam explain`` and
            ``cubcam evaluate`` run them).
        kind: the model kind, "auto" (the module's ``cam_kind``), "classifier" (GradCAM's class logits) or
            "embedding" (EmbeddingCAM's proxies); it must fit the module.
        proxy: EmbeddingCAM's proxy (``cubcam.cams.targets.ProxyScheme``), from the epoch's validation embeddings:
            "normalized_mean" (the class's Normalized Mean Proxy), "single_point_random" (one validation image of
            the class, drawn with ``seed``) or "single_point_nearest" (the nearest other validation image, shown
            beside the bird).
        target: the class of the primary map: "true" or "predicted"; the other one is shown too when it differs.
        colormap: the heatmap overlay's colormap (``cubcam.cams.overlay``).
        alpha: the heatmap overlay's opacity, in [0, 1].
        log_metrics: compute and log the localization metrics.
        metrics_subset: validation images the metrics use (None: 512, or all when fewer; 128 with
            ``target_layer``, where each costs a forward and a backward every epoch).
        seed: seeds the choice of the panel and of the metric subset.
        target_layer: for a module that does not speak the CAM protocol (any LightningModule): the dotted name of
            the layer to explain inside it, e.g. ``"net.layer4"`` or ``"model.stages.3"``. The callback then runs
            its own eval-mode forward and backward on the panel (and the metric subset, when the data has boxes)
            each epoch; the outputs of the validation loop's own ``self(images)`` calls are reused, not recomputed.
            ``kind="auto"`` means ``"classifier"`` there; ``"embedding"`` when ``module(images)`` returns
            embeddings.
        reshape: with ``target_layer``, how that layer's output becomes a map [B, K, h, w] (e.g. ViT tokens; see
            ``cubcam.cams.engine.Reshape``); None when it is one.
        output: with ``target_layer``, what picks the logits or embeddings from what ``module(images)`` returns, as
            the engine's ``CAM(output=...)`` takes it: a key (``"logits"`` for a Hugging Face ``ModelOutput``), an
            index (a tuple's) or a callable; applied before ``score``.
        score: a classifier's own score, ``score(outputs [B, C], classes [B]) -> [B]`` (differentiable), for heads
            whose logit of a class is not the score to explain (multi-label sigmoids, a margin). Without it a
            classifier explains the class logit; a single-logit head [B, 1] is binary: class 1 explains the logit,
            class 0 its negation.
        image_key: where dict batches and dataset items keep the images (tuples are ``(images, labels[, boxes])``).
        label_key: where they keep the labels.
        box_key: where they keep the optional boxes (``[x, y, w, h]`` in the image tensor's pixels).
        finer: Finer-CAM (Zhang et al., CVPR 2025) in the panel: "wrong" (default) appends a third tile to each bird
            the model gets wrong, what tells its true class apart from the predicted one (the true class's score
            minus the predicted class's); "every" appends one to every bird, its class against its 3 nearest rivals;
            "off". Head-only, in the same pass as the other maps (one more backward of the panel's birds). Not
            drawn where there is no rival to subtract: a binary head, ``score=``, "eigencam" and the
            ``single_point_nearest`` proxy.
        aug_smooth: refused (True is a ValueError): pytorch-grad-cam's test-time smoothing runs the model on six
            views of every image, every epoch; ``cubcam explain --aug-smooth`` and the engine's ``aug_smooth=True``
            run it on a checkpoint.


    Raises:
        ValueError: an argument out of range, a method the loop cannot afford (above); at ``setup``, a ``kind``
            that does not fit the module, or a ``ModelCheckpoint`` / ``EarlyStopping`` that monitors a CAM metric
            on epochs without one (``every_n_epochs`` > 1, ``log_metrics=False``).
        TypeError: at ``setup``, a module that does not speak the CAM protocol and no ``target_layer``; at a
            validation batch, a step output that is not a ``CAMStepOutput``, or a batch that ``image_key`` /
            ``label_key`` do not fit; a validation dataset that is not map-style, or a shuffled validation loader.
        AttributeError: at ``setup``, a ``target_layer`` that names no submodule (the message names it).
    """

    def __init__(
        self,
        num_images: int = 16,
        every_n_epochs: int = 1,
        method: Method = "gradcam",
        kind: KindArg = "auto",
        proxy: ProxyScheme = "normalized_mean",
        target: Choice = "true",
        colormap: str = "jet",
        alpha: float = 0.5,
        log_metrics: bool = True,
        metrics_subset: int | None = None,
        seed: int = 0,
        target_layer: str | None = None,
        reshape: Reshape | None = None,
        score: Callable[[Tensor, Tensor], Tensor] | None = None,
        image_key: str = "image",
        label_key: str = "label",
        box_key: str = "box",
        finer: FinerMode = "wrong",
        aug_smooth: bool = False,
        output: OutputSelector = None,
    ):
        fmt = BatchFormat(image_key, label_key, box_key)
        self.options = PanelOptions(
            num_images, every_n_epochs, method, kind, proxy, target, colormap, alpha, log_metrics, metrics_subset,
            seed, target_layer, reshape, score, fmt, finer, aug_smooth, output,
        )  # fmt: skip
        # Chosen once and saved in checkpoints: the panel's and the metric subset's dataset indices, the evolution.
        self.panel: list[int] | None = None
        self.subset: list[int] | None = None
        self.evolution = Evolution()
        self._source: ActivationSource | None = None  # made at setup, from the module
        self._epoch: EpochCollector | None = None  # this validation epoch's rows, while one is collected
        self._sinks: list[PanelSink] | None = None  # made at the first panel of a run
        self._pictures = PictureThread(lambda: self._sinks or [])
        self._told: set[str] = set()  # what a run is told once
        self._checked = False  # the layer, reshape, output and batch format have given one map this run

    @property
    def state_key(self) -> str:
        # Every option that changes what the panel shows (two such panels in one Trainer keep their own state);
        # not the seed: a run resumed with another seed still shows the birds it showed before.
        o = self.options
        return self._generate_state_key(
            num_images=o.num_images,
            method=o.method,
            kind=o.kind,
            proxy=o.proxy,
            target=o.target,
            target_layer=o.target_layer,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"panel": self.panel, "subset": self.subset, "evolution": self.evolution.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The saved panel, subset and evolution; one this class did not write is a warning and a fresh choice."""
        try:
            self.panel, self.subset, self.evolution = saved_choice(state_dict)
        except (ValueError, TypeError) as err:
            _warn(f"the checkpoint's panel state is not one this CAMPanel wrote ({err}); choosing a new panel")
            self.panel, self.subset, self.evolution = None, None, Evolution()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = [key for key in checkpoint.get("callbacks") or {} if str(key).startswith("CAMPanel")]
        if saved and self.state_key not in saved:
            _warn(f"the checkpoint's panel was saved with other options ({saved[0]}); choosing a new panel")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._sinks, self._told, self._checked = None, set(), False
        unserved = unserved_loggers(trainer)
        if unserved and trainer.is_global_zero:
            _warn(
                f"{', '.join(unserved)} cannot show the panels (cubcam logs images to W&B, TensorBoard and MLflow); "
                f"they go to {png_folder(trainer)} as PNG files instead"
            )
        self._source = activation_source(pl_module, self.options)
        if stage == "fit":
            check_monitors(self.options, trainer.callbacks)  # type: ignore[attr-defined]

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._commit(self._pictures.take())
        self._epoch = None
        if self._source is None or trainer.sanity_checking or (trainer.current_epoch + 1) % self.options.every_n_epochs:
            return
        size = len(val_dataset(trainer))
        if self.panel is not None and max(self.panel) >= size:
            _warn(f"the saved panel does not fit a validation set of {size} images; choosing a new one")
            self.panel = None
        wanted = min(self.options.metrics_subset or size, size)
        if self.options.log_metrics and (self.subset is None or max(self.subset) >= size or len(self.subset) != wanted):
            self.subset = random_subset(size, wanted, torch.Generator().manual_seed(self.options.seed + 1))
        self._source.start_epoch(trainer, pl_module)
        # Outputs only where the epoch needs them: to choose the panel, and an embedding net's proxies.
        keep = self.panel is None or self._source.explainer.cam_kind == "embedding"
        self._epoch = EpochCollector(self.panel, (self.subset or []) if self.options.log_metrics else [], keep)

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
        if self._source is None or dataloader_idx != 0:
            return
        if not self._checked:  # Lightning's sanity check, or else the first validation batch
            self._check(self._source, trainer, pl_module, batch, outputs)
        if self._epoch is not None:
            self._epoch.add(*self._source.rows(outputs, batch, batch_idx))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fail fast where no sanity check ran (``num_sanity_val_steps=0``, a resumed run): the check of
        :meth:`_check` on the first validation items, before any training step."""
        if not self._checked and self._source is not None and val_loader(trainer) is not None:
            self._check(self._source, trainer, pl_module, None, None)

    def _check(
        self, source: ActivationSource, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, outputs: Any
    ) -> None:
        """The layer, ``reshape``, ``output`` and the batch format, on one map of the first image of ``batch`` (a
        validation batch and its step output), or of the first validation items read through the loader's
        ``collate_fn`` (``batch`` None); the items' keys are read too, as the panel reads its birds. Inside the RNG
        isolation (the trained weights stay bit-identical) and on every rank (no collective: DDP does not hang)."""
        dataset, fmt, device = val_dataset(trainer), self.options.format, pl_module.device
        if not len(dataset):
            return
        with isolated(device):
            items = read_items(dataset, list(range(min(2, len(dataset)))), device, fmt, val_collate(trainer))
            images = items["image"] if batch is None else fmt.read(batch)[0].to(device)
            source.check(images, outputs)
        self._checked = True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        collected, self._epoch = self._epoch, None
        if collected is None or self._source is None:
            return
        self._source.end_epoch()
        strategy = trainer.strategy
        collectives = Collectives(
            strategy.all_gather,
            lambda rows: strategy.reduce(rows, reduce_op="sum"),
            trainer.world_size,
            trainer.is_global_zero,
        )
        dataset = val_dataset(trainer)
        epoch = Epoch(
            trainer.current_epoch,
            metrics_step(trainer),
            dataset,
            class_names(dataset, pl_module),
            pl_module.device,
            val_collate(trainer),
        )
        done = epoch_maps(self.options, self._source.explainer, collected, collectives, epoch)
        self.panel = done.panel
        for key, value in (done.metrics or {}).items():
            pl_module.log(key, value, sync_dist=trainer.world_size > 1)
        for what, message in done.notes:  # each told once a run
            if what in self._told:
                continue
            self._told.add(what)
            if what == "no boxes":  # not a problem: data without boxes
                rank_zero_info(f"CAMPanel: {message}")
            else:
                _warn(message)
        for problem in done.problems:
            _warn(problem)
        if done.frame is not None:
            self.evolution.add(done.frame)
        if done.job is not None:
            self._sinks_of(trainer)
            self._pictures.submit(done.job)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._commit(self._pictures.take())  # a look at a list: microseconds

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The last panels, then the CAM evolution (every panel epoch of the run, a resumed one's too) to every
        sink. Waits for the picture thread; Ctrl-C interrupts the wait."""
        self._commit(self._pictures.drain()[0])
        if trainer.is_global_zero and len(self.evolution):
            copy = Evolution(list(self.evolution.indices), list(self.evolution.frames))
            style = Style(self.options.colormap, self.options.alpha)
            self._sinks_of(trainer)
            self._pictures.submit(EvolutionJob(copy, metrics_step(trainer), style))
            self._commit(self._pictures.drain()[0])

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown after an exception (and ignores SIGINT from here on): a short wait, no more.
        drawn, dropped = self._pictures.drain(timeout=EXIT_WAIT)
        self._commit(drawn, failing=True)
        if dropped:
            _warn(f"the run ended with {dropped} panel(s) not yet drawn; they are dropped (the metrics were logged)")
        self._close(timeout=0.0 if dropped else None)  # a picture still drawn ends with the process (daemon)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._commit(self._pictures.drain()[0])
        self._close()

    def _close(self, timeout: float | None = None) -> None:
        self._pictures.close(timeout)
        if self._source is not None:
            self._source.end_epoch()

    def _commit(self, drawn: list[Drawn], failing: bool = False) -> None:
        """On the loop's thread: what the picture thread left (W&B's log call), its warnings and its errors (raised;
        in a run already ``failing``, a warning, so that what ends the run stays its own exception)."""
        for done in drawn:
            if done.error is not None and not failing:
                raise done.error
            if done.error is not None:
                _warn(f"the picture thread failed too: {type(done.error).__name__}: {done.error}")
            for problem in done.problems:
                _warn(problem)
            for name, commit in done.commits:
                try:
                    commit()
                except Exception as err:  # a log call must never end a training run
                    what = "the CAM evolution" if done.epoch < 0 else f"the panel of epoch {done.epoch}"
                    _warn(f"could not log {what} to {name}: {type(err).__name__}: {err}")

    def _sinks_of(self, trainer: pl.Trainer) -> list[PanelSink]:
        """The run's sinks, made once on the loop's thread."""
        if self._sinks is None:
            self._sinks = make_sinks(trainer, list(METRIC_KEYS) if self.options.log_metrics else [], _warn)
        return self._sinks


def _warn(message: str) -> None:
    warnings.warn(f"CAMPanel: {message}", CAMPanelWarning, stacklevel=2)
