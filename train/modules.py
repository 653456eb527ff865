"""The two LightningModules: a CUB classifier and a triplet-loss embedding net.

Both are thin: the network is a plain nn.Module from ``cubcam.train.models``, the constructors take plain arguments
(``load_from_checkpoint`` works without the CLI), and both speak the CAM protocol (``cubcam.cams.protocol``) the
callback, ``cubcam explain`` and ``cubcam evaluate`` rely on: ``cam_kind``, ``cam_target_layer``,
``cam_reshape``, ``forward_head``, and a ``validation_step`` that returns a ``CAMStepOutput`` (the CAM layer's
activations with the outputs), so a callback needs no second forward. ``monitor`` is what ``BestCheckpoint`` keeps
the best epoch by.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from cubcam import CubcamWarning
from cubcam.cams.distributed import gather_unique
from cubcam.cams.engine import Reshape
from cubcam.cams.protocol import CAMStepOutput, step_output
from cubcam.cams.targets import Kind
from cubcam.train.models import BackboneConfig, PooledLinearNet, build_backbone

RETRIEVAL_METRICS = ("precision_at_1", "mean_average_precision_at_r", "r_precision")
TRIPLETLESS_STEPS = 3  # training batches in a row without a possible triplet before EmbeddingNet warns
Miner = Literal["all", "hard", "semihard", "easy"]  # pytorch-metric-learning's TripletMarginMiner types


def default_class_names(class_names: list[str] | None, num_classes: int | None) -> list[str]:
    """The given names, or "class 0", "class 1", ... so captions never lack a name."""
    if class_names is not None:
        names = [str(name) for name in class_names]
        if num_classes is not None and len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} names but num_classes is {num_classes}")
        return names
    return [f"class {i}" for i in range(num_classes or 0)]


def build_optimizer(
    net: PooledLinearNet, lr: float, weight_decay: float, backbone_lr_factor: float, total_steps: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (the pretrained trunk at ``lr * backbone_lr_factor``) with a per-step cosine decay to zero over
    ``total_steps``; a constant rate where training has no end (``total_steps`` infinite: ``max_epochs=-1`` without
    ``max_steps``), since a decay needs an end to decay to."""
    backbone = list(net.backbone.parameters())
    trunk = {id(p) for p in backbone}
    head = [p for p in net.parameters() if id(p) not in trunk]  # by identity: a compiled net's names differ
    optimizer = torch.optim.AdamW(
        [{"params": backbone, "lr": lr * backbone_lr_factor}, {"params": head, "lr": lr}], weight_decay=weight_decay
    )
    if not math.isfinite(total_steps):
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    total = max(1, int(total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    return optimizer, scheduler


class CUBModule(pl.LightningModule):
    """What both models share: the network and optimiser arguments, the CAM protocol, the optimiser and the
    schedule.

    The network arguments are declared here once, flat (the config keys users write, ``--model.init_args.arch``):
    the subclasses take their own arguments and hand the rest to this constructor (``**kwargs``; jsonargparse and
    Lightning's ``save_hyperparameters`` both follow them), which packs them into a
    :class:`~cubcam.train.models.BackboneConfig`. Subclasses set ``net`` (from :meth:`_pooled_net`) and
    ``class_names``.

    Args:
        arch: a torchvision ResNet name (``resnet18/34/50``) or any timm model name (``convnext_atto``,
            ``efficientnet_b0``, ``vit_small_patch16_224``, ...; ``cubcam.train.models`` explains where each kind's
            CAM layer sits).
        pretrained: load ImageNet weights (torchvision's, or timm's from the Hugging Face hub).
        weights_path: a local weights file instead.
        output_stride: 16 dilates the last stage where the model supports it.
        image_size: the image size, for models whose patch grid is fixed when built (ViTs; the CLI links it to
            ``data.image_size``).
        lr: the head's learning rate (AdamW, cosine decay per step).
        weight_decay: AdamW's.
        backbone_lr_factor: the trunk learns at ``lr * backbone_lr_factor``.
    """

    cam_kind: ClassVar[Kind]
    monitor: ClassVar[tuple[str, Literal["min", "max"]]]  # the validation score that picks the best checkpoint
    net: PooledLinearNet
    class_names: list[str]

    def __init__(
        self,
        arch: str = "resnet18",
        pretrained: bool = False,
        weights_path: str | Path | None = None,
        output_stride: int = 32,
        image_size: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        backbone_lr_factor: float = 1.0,
        **unknown: Any,
    ):
        # **unknown exists for Lightning: load_from_checkpoint filters a checkpoint's saved arguments to those a
        # constructor without **kwargs names, which would drop the class path that lets CUBModule.load_from_checkpoint
        # build the saved subclass. Anything that arrives here is a mistake.
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(unknown)}")
        super().__init__()
        # These arguments and the subclass's (Lightning collects both frames). An image_size of None (the net is
        # not fixed to one) is left out: Lightning refuses to log a module and a datamodule whose hyper-parameters
        # share a name with different values, and the datamodule's image_size is the size it serves.
        self.save_hyperparameters(ignore=["image_size"] if image_size is None else [])
        self.backbone_config = BackboneConfig(arch, pretrained, weights_path, output_stride, image_size)
        self.lr, self.weight_decay, self.backbone_lr_factor = lr, weight_decay, backbone_lr_factor

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.net.backbone.cam_layer

    @property
    def cam_reshape(self) -> Reshape | None:
        return self.net.backbone.reshape

    def _pooled_net(self, out_features: int) -> PooledLinearNet:
        """The network of both subclasses: the trunk of :attr:`backbone_config`, pooled, then linear."""
        return PooledLinearNet(build_backbone(self.backbone_config), out_features)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def forward_head(self, feature_maps: Tensor) -> Tensor:
        return self.net.forward_head(feature_maps)

    def _cam_outputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(CAM-layer activations, outputs) from one pass: the head runs on the maps the trunk produced."""
        activations = self.net.forward_features(batch["image"])
        return activations, self.net.forward_head(activations)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        steps = float(self.trainer.estimated_stepping_batches)  # infinite: max_epochs=-1 and no max_steps
        if not math.isfinite(steps):
            rank_zero_info(
                "training has no end (max_epochs=-1, no max_steps): the learning rate stays constant; set "
                "trainer.max_steps or trainer.max_epochs for its cosine decay"
            )
        optimizer, scheduler = build_optimizer(self.net, self.lr, self.weight_decay, self.backbone_lr_factor, steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        # What Lightning's LearningRateMonitor logs, without its need for a logger (the demo may run with none).
        for name, group in zip(("backbone", "head"), self.trainer.optimizers[0].param_groups):
            self.log(f"train/lr_{name}", float(group["lr"]), on_step=False, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The checkpoint holds the trained weights: loading it must not download or read the ImageNet ones again.
        checkpoint["hyper_parameters"] = {
            **checkpoint.get("hyper_parameters", {}),
            "pretrained": False,
            "weights_path": None,
        }


class Classifier(CUBModule):
    """A classifier (any backbone) trained with cross-entropy; logs ``train/loss``, ``train/acc``, ``val/loss``,
    ``val/acc`` (and ``test/loss``, ``test/acc`` when tested)."""

    cam_kind = "classifier"
    monitor = ("val/acc", "max")

    def __init__(
        self,
        num_classes: int = 200,
        class_names: list[str] | None = None,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ):
        """The classifier's own arguments; the network and optimiser ones go to :class:`CUBModule`.

        Args:
            num_classes: the head's classes (the CLI links it to ``data.num_classes``).
            class_names: their names, for captions (linked to ``data.class_names``).
            label_smoothing: of the cross-entropy.
        """
        super().__init__(**kwargs)
        self.label_smoothing = label_smoothing
        self.net = self._pooled_net(num_classes)
        self.class_names = default_class_names(class_names, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        batch_size = len(logits)
        self.train_acc(logits, batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> CAMStepOutput:
        activations, logits = self._cam_outputs(batch)
        self._log_scores("val", self.val_acc, logits, batch["label"])
        return step_output(activations, logits, batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._log_scores("test", self.test_acc, self(batch["image"]), batch["label"])

    def _log_scores(self, stage: str, accuracy: MulticlassAccuracy, logits: Tensor, labels: Tensor) -> None:
        batch_size = len(logits)
        accuracy(logits, labels)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), sync_dist=True, batch_size=batch_size)
        self.log(f"{stage}/acc", accuracy, prog_bar=True, batch_size=batch_size)


class EmbeddingNet(CUBModule):
    """Backbone -> pool -> linear -> embedding (compared by cosine), trained with a triplet margin loss on mined
    triplets.

    Train it on m-per-class batches (``data.sampler: m_per_class``) so every batch holds positives. Validation is
    retrieval on the whole validation split (gathered from all ranks): each image queries all others by cosine
    similarity; ``val/precision_at_1``, ``val/mean_average_precision_at_r`` and ``val/r_precision`` are logged (and
    ``test/*`` alike when tested).
    ``num_classes``/``class_names`` describe the training classes (for captions; the loss does not need them).
    """

    cam_kind = "embedding"
    monitor = ("val/precision_at_1", "max")

    def __init__(
        self,
        embedding_dim: int = 128,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        margin: float = 0.2,
        miner: Miner = "semihard",
        **kwargs: Any,
    ):
        """The embedding net's own arguments; the network and optimiser ones go to :class:`CUBModule`.

        Args:
            embedding_dim: the embedding's dimension.
            num_classes: the training classes (for captions; linked to ``data.num_classes``).
            class_names: their names (linked to ``data.class_names``).
            margin: of the triplet loss and the miner.
            miner: pytorch-metric-learning's triplet type.
        """
        super().__init__(**kwargs)
        self.net = self._pooled_net(embedding_dim)
        self.class_names = default_class_names(class_names, num_classes)
        self.miner = miners.TripletMarginMiner(margin=margin, type_of_triplets=miner)
        self.loss_fn = losses.TripletMarginLoss(margin=margin)
        self.retrieval = AccuracyCalculator(
            include=RETRIEVAL_METRICS, knn_func=CustomKNN(CosineSimilarity(), batch_size=1024)
        )
        self._collected: list[tuple[Tensor, Tensor, Tensor]] = []  # (index, embeddings, labels) of each batch
        self._tripletless = 0  # training batches in a row that can hold no triplet; -1 once warned

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        embeddings = self(batch["image"])
        self._check_triplets(batch["label"])
        triplets = self.miner(embeddings, batch["label"])
        loss = self.loss_fn(embeddings, batch["label"], triplets)
        batch_size = len(embeddings)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/mined_triplets", float(self.miner.num_triplets), batch_size=batch_size)
        return loss

    def _check_triplets(self, labels: Tensor) -> None:
        """One warning once ``TRIPLETLESS_STEPS`` batches in a row can hold no triplet (an anchor needs a positive of
        its class and a negative of another): their loss is exactly 0 and nothing is learned, silently."""
        if self._tripletless < 0:
            return
        counts = labels.unique(return_counts=True)[1]
        if len(counts) >= 2 and int(counts.max()) >= 2:
            self._tripletless = 0
            return
        self._tripletless += 1
        if self._tripletless == TRIPLETLESS_STEPS:
            self._tripletless = -1
            rank_zero_warn(
                f"EmbeddingNet: {TRIPLETLESS_STEPS} training batches in a row can hold no triplet (this one: "
                f"{len(labels)} images of {len(counts)} class(es)), so the loss is 0 and nothing is learned; give "
                f"each batch several classes with several images each: data.sampler m_per_class with "
                f"data.batch_size a multiple of data.m_per_class and larger than it (the miner, "
                f"{self.miner.type_of_triplets}, mines within a batch)",
                category=CubcamWarning,
            )

    def on_validation_epoch_start(self) -> None:
        self._collected = []

    def on_test_epoch_start(self) -> None:
        self._collected = []

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> CAMStepOutput:
        activations, embeddings = self._cam_outputs(batch)
        self._collected.append((batch["index"], embeddings.detach(), batch["label"]))
        return step_output(activations, embeddings, batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._collected.append((batch["index"], self(batch["image"]), batch["label"]))

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval("val")

    def on_test_epoch_end(self) -> None:
        self._log_retrieval("test")

    def _all_gather(self, tensor: Tensor) -> Tensor:
        """``all_gather`` of one tensor (Lightning's takes any collection)."""
        return cast(Tensor, self.all_gather(tensor))

    def _log_retrieval(self, stage: str) -> None:
        """Retrieval over the whole split: the epoch's embeddings gathered from every rank, each image once."""
        if not self._collected:
            return
        index, embeddings, labels = (torch.cat(column) for column in zip(*self._collected))
        _, embeddings, labels = gather_unique(self._all_gather, self.trainer.world_size, index, embeddings, labels)
        bad = int((~torch.isfinite(embeddings).all(1)).sum())
        if bad:
            # A diverged net: its metrics are NaN (pytorch-metric-learning cannot rank NaNs) and training stops
            # cleanly, so the best checkpoint so far is kept, tested and reported as usual.
            rank_zero_warn(
                f"training diverged at epoch {self.current_epoch}: {bad} of {len(embeddings)} {stage} embeddings are "
                f"not finite; the {stage} retrieval metrics are NaN" + ("; training stops" if stage == "val" else ""),
                category=CubcamWarning,
            )
            metrics = dict.fromkeys(RETRIEVAL_METRICS, math.nan)
            if stage == "val" and self.trainer.state.fn == "fit":
                self.trainer.should_stop = True
        else:
            metrics = self.retrieval.get_accuracy(embeddings, labels)
        for name in RETRIEVAL_METRICS:
            self.log(f"{stage}/{name}", float(metrics[name]), prog_bar=name == "precision_at_1", sync_dist=True)
