"""CAMPanel: where the model looks on a fixed validation panel, and how well that matches the birds' boxes, every
validation epoch, in W&B and as a PNG grid.

    trainer = pl.Trainer(callbacks=[CAMPanel(num_images=16)], logger=WandbLogger(project="cubcam"))

What it relies on (the CAM protocol, duck-typed; nothing here imports ``train``): ``module.cam_kind`` ("classifier"
or "embedding"), ``module.cam_target_layer``, ``module.class_names``, ``module(images)``, ``module.forward_head(maps)``
and a ``validation_step`` returning ``{"feature_maps", "output", "labels", "index"}``; the validation dataset is
map-style (``dataset[i]`` a dict with ``image``, ``label``, ``box``; optionally ``mean``/``std``/``class_names``).

The panel's maps come from the feature maps and outputs the validation loop already produced for those birds
(gathered to rank zero under DDP), through the head alone (``cubcam.cams.protocol.head_cams``). Only the epoch that chooses
the panel, and the neighbours of ``proxy="single_point"``, read images from the dataset and run a forward.

How it stays out of training's way (so the trained weights are bit-identical with and without it):
- Lightning validates under ``torch.inference_mode``; the callback's work runs in ``torch.inference_mode(False)`` with
  gradients enabled, on clones of the inference tensors, and the backward is ``torch.autograd.grad`` to the CAM
  layer's activations only: no ``.grad`` is written, no hook outlives a call;
- its own forwards run with the model in eval mode (BatchNorm statistics untouched) and restore the train flags;
- ``torch.random.fork_rng`` (CPU and the module's CUDA device) and saved Python/NumPy RNG states hide anything it
  draws from the random stream training uses; the panel and the metric subset come from its own seeded generator.

Localization metrics (``val/cam_max_box_acc`` = MaxBoxAccV2, ``val/cam_box_acc_iou50``, ``val/cam_heatmap_ratio``,
``val/cam_pointing_game``) are computed over a fixed, seeded subset of the validation set (``metrics_subset``,
default 512 images or all when fewer), from the feature maps the validation loop already produced (head-only CAMs:
no second backbone pass). A subset because (1) an embedding net's proxies exist only once the epoch's embeddings
are all in, so the feature maps must be kept until the epoch ends, and the whole CUB test set's (5,794 x 2048 x 7 x
7 floats = 2.3 GB at ResNet-50/224 px, 4x that at output stride 16) would not fit; (2) MaxBoxAccV2 labels connected
regions at 100 thresholds per image, which over all 5,794 images would cost more than the ~3% budget of an epoch.
From about 180 px square up the labelling runs in threads (training waits at the epoch's end, so its cores are
free).
The subset's CAMs are for the true class (classifier; the WSOL convention) or its proxy (embedding net).

The PNG grid goes to ``<save_dir>/<name>/<version>/cam_panels/epoch_NNN.png`` of the first logger, i.e. beside
Lightning's ``checkpoints/`` folder (for W&B: ``<save_dir>/<project>/<run id>/``), or
``<default_root_dir>/cam_panels/`` without a logger. Writing or logging that fails is a warning, never an error.
"""

from __future__ import annotations

import random
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from cubcam.callbacks.panel_render import Cell, Strip, name, render_strip, wandb_boxes
from cubcam.callbacks.panel_select import random_subset, spread_over_classes
from cubcam.cams import localization, normalized_mean_proxies, single_point_proxy
from cubcam.cams.figure import grid, save_png
from cubcam.cams.overlay import IMAGENET_MEAN, IMAGENET_STD, colorize, denormalize
from cubcam.cams.protocol import features_and_outputs, head_cams

PANEL_KEY = "val/cam_panel"
METRIC_KEYS = ("val/cam_max_box_acc", "val/cam_box_acc_iou50", "val/cam_heatmap_ratio", "val/cam_pointing_game")
DEFAULT_METRICS_SUBSET = 512
CAM_BOX_THRESHOLD = 0.5  # where the panel's CAM box is cut until the metrics find the best IoU-0.5 threshold
METRIC_CHUNK = 64  # subset images per head-only CAM / box-metric batch
PANEL_COLUMNS = 4  # strips per row of the PNG grid
STEP_KEYS = ("feature_maps", "output", "labels", "index")
KINDS = {"classifier": "gradcam", "embedding": "embeddingcam"}


class CAMPanelWarning(UserWarning):
    """A panel could not be rendered, logged or written; training goes on."""


class CAMPanel(pl.Callback):
    """GradCAM (classifiers) / EmbeddingCAM (embedding nets) heatmaps of a fixed validation panel every
    ``every_n_epochs`` validation epochs, logged as one ``wandb.Image`` list under ``val/cam_panel`` (with the
    GT and CAM boxes as W&B box groups) and written as a PNG grid; plus CAM localization metrics (see module doc).

    Args:
        num_images: birds in the panel, spread over as many classes as possible.
        every_n_epochs: render and measure every n-th validation epoch (never during the sanity check).
        method: "auto" (GradCAM for ``cam_kind == "classifier"``, EmbeddingCAM for "embedding"), "gradcam" or
            "embeddingcam" (must fit the model).
        proxy: EmbeddingCAM's proxy: "normalized_mean" (the class's Normalized Mean Proxy over the validation
            embeddings) or "single_point" (the nearest other validation image, shown beside the bird).
        target: the class of the primary map: "true" or "predicted"; the other one is shown too when it differs.
        colormap, alpha: the heatmap overlay (``cubcam.cams.overlay``).
        log_metrics: compute and log the localization metrics.
        metrics_subset: validation images the metrics use (None: 512, or all when fewer).
        seed: seeds the choice of the panel and of the metric subset.
    """

    def __init__(self, num_images: int = 16, every_n_epochs: int = 1, method: str = "auto",
                 proxy: str = "normalized_mean", target: str = "true", colormap: str = "jet", alpha: float = 0.5,
                 log_metrics: bool = True, metrics_subset: int | None = None, seed: int = 0):
        for arg, value in (("num_images", num_images), ("every_n_epochs", every_n_epochs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CAMPanel: {arg} must be a positive integer, got {value!r}")
        if metrics_subset is not None and (not isinstance(metrics_subset, int) or metrics_subset < 1):
            raise ValueError(f"CAMPanel: metrics_subset must be None or a positive integer, got {metrics_subset!r}")
        for arg, value, choices in (("method", method, ("auto", *KINDS.values())),
                                    ("proxy", proxy, ("normalized_mean", "single_point")),
                                    ("target", target, ("true", "predicted"))):
            if value not in choices:
                raise ValueError(f"CAMPanel: {arg} must be one of {choices}, got {value!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"CAMPanel: alpha must lie in [0, 1], got {alpha!r}")
        colorize(np.zeros(1), colormap)  # raises ValueError naming the known colormaps
        if not isinstance(seed, int):
            raise ValueError(f"CAMPanel: seed must be an integer, got {seed!r}")
        self.num_images, self.every_n_epochs = num_images, every_n_epochs
        self.method, self.proxy, self.target = method, proxy, target
        self.colormap, self.alpha = colormap, float(alpha)
        self.log_metrics, self.seed = log_metrics, seed
        self.metrics_subset = metrics_subset or DEFAULT_METRICS_SUBSET
        self.panel: list[int] | None = None  # dataset indices, chosen once (saved in checkpoints)
        self.subset: list[int] | None = None
        self._active = False
        # What one validation epoch hands over (cleared at its end):
        self._seen: list[tuple[Tensor, Tensor]] = []  # (labels, index), until the panel is chosen
        self._panel_rows: list[dict[str, Tensor]] = []  # the panel birds' images, boxes, feature maps, outputs
        self._embeddings: list[tuple[Tensor, Tensor, Tensor]] = []  # (embeddings, labels, index), embedding nets
        self._stored: list[dict[str, Tensor]] = []  # the metric subset's feature maps, boxes, labels, index
        self._panel_index = self._subset_index = torch.zeros(0, dtype=torch.long)  # as tensors, for torch.isin
        self._image_size: tuple[int, int] = (0, 0)  # of the validation images (the metrics' maps are upsampled to it)
        self._box_threshold = CAM_BOX_THRESHOLD

    @property
    def state_key(self) -> str:
        # Not keyed on the seed: a run resumed with another seed still shows the birds it showed before.
        return self._generate_state_key(num_images=self.num_images, method=self.method, proxy=self.proxy)

    def state_dict(self) -> dict[str, Any]:
        return {"panel": self.panel, "subset": self.subset}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.panel, self.subset = state_dict.get("panel"), state_dict.get("subset")

    # --- hooks ---------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        kind = getattr(pl_module, "cam_kind", None)
        if kind not in KINDS:
            raise TypeError(f"CAMPanel needs a module with cam_kind 'classifier' or 'embedding' (the CAM protocol), "
                            f"got {type(pl_module).__name__} with cam_kind={kind!r}")
        for attribute in ("cam_target_layer", "forward_head", "class_names"):
            if not hasattr(pl_module, attribute):
                raise TypeError(f"CAMPanel: {type(pl_module).__name__} lacks {attribute!r} (the CAM protocol)")
        if self.method != "auto" and self.method != KINDS[kind]:
            raise ValueError(f"CAMPanel: method={self.method!r} does not fit a module with cam_kind={kind!r} "
                             f"(use {KINDS[kind]!r} or 'auto')")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        self._clear()
        if not self._active:
            return
        size = len(_val_dataset(trainer))
        if self.panel is not None and max(self.panel) >= size:
            _warn(f"the saved panel does not fit a validation set of {size} images; choosing a new one")
            self.panel = None
        if self.log_metrics and (self.subset is None or max(self.subset, default=-1) >= size
                                 or len(self.subset) != min(self.metrics_subset, size)):
            self.subset = random_subset(size, self.metrics_subset, self._generator(1))
        self._panel_index = torch.tensor(self.panel or [], dtype=torch.long)
        self._subset_index = torch.tensor(self.subset or [], dtype=torch.long)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active or dataloader_idx != 0:
            return
        if not isinstance(outputs, dict) or any(key not in outputs for key in STEP_KEYS):
            raise TypeError(f"CAMPanel: validation_step must return a dict with keys {STEP_KEYS} (the CAM "
                            f"protocol), got {type(outputs).__name__}"
                            + (f" with keys {sorted(outputs)}" if isinstance(outputs, dict) else ""))
        index, labels = outputs["index"].detach(), outputs["labels"].detach()
        if self.panel is None:
            self._seen.append((labels.cpu(), index.cpu()))
        else:  # kept even when empty: its shapes let every rank join the gather at the epoch's end
            self._panel_rows.append(_rows(self._panel_index, index, {
                "index": index, "image": batch["image"], "box": batch["box"], "label": labels,
                "feature_maps": outputs["feature_maps"], "output": outputs["output"]}))
        if pl_module.cam_kind == "embedding":
            self._embeddings.append((outputs["output"].detach(), labels, index))
        if self.log_metrics:
            rows = _rows(self._subset_index, index, {"index": index, "feature_maps": outputs["feature_maps"],
                                                     "box": batch["box"], "label": labels})
            if len(rows["index"]):
                self._stored.append(rows)
            self._image_size = tuple(batch["image"].shape[-2:])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        try:
            with _isolated(pl_module.device):
                # Collectives first, on every rank in the same order; rank zero alone renders afterwards.
                embeddings = self._gather_embeddings(trainer) if pl_module.cam_kind == "embedding" else None
                captured = self._gather_panel(trainer) if self.panel is not None else None
                if self.panel is None:
                    self._choose_panel(trainer)
                if self.log_metrics:
                    self._log_metrics(trainer, pl_module, embeddings)
                if trainer.is_global_zero:
                    self._render_and_log(trainer, pl_module, captured, embeddings)
        finally:
            self._clear()

    def _clear(self) -> None:
        self._seen, self._panel_rows, self._embeddings, self._stored = [], [], [], []

    # --- collecting ----------------------------------------------------------------------------------------------

    def _generator(self, use: int) -> torch.Generator:
        """A fresh generator per use (0: the panel, 1: the metric subset), so neither choice depends on when or
        whether the other one was made."""
        return torch.Generator().manual_seed(self.seed + use)

    def _choose_panel(self, trainer: pl.Trainer) -> None:
        """Spread over the classes of the images this validation run saw (all ranks' labels; identical everywhere)."""
        empty = torch.zeros(0, dtype=torch.long)
        labels = torch.cat([labels for labels, _ in self._seen]) if self._seen else empty
        index = torch.cat([index for _, index in self._seen]) if self._seen else empty
        index, labels = _gather_unique(trainer, index, labels)
        if len(index):
            self.panel = index[spread_over_classes(labels.tolist(), self.num_images, self._generator(0))].tolist()

    def _gather_embeddings(self, trainer: pl.Trainer) -> tuple[Tensor, Tensor, Tensor]:
        """All ranks' (embeddings, labels, index), each dataset index once, sorted by index."""
        if not self._embeddings:
            raise RuntimeError("CAMPanel: the validation loop produced no embeddings")
        embeddings, labels, index = (torch.cat(parts) for parts in zip(*self._embeddings))
        index, embeddings, labels = _gather_unique(trainer, index, embeddings.float(), labels)
        return embeddings, labels, index

    def _gather_panel(self, trainer: pl.Trainer) -> dict[str, Tensor] | None:
        """The panel birds' rows of this epoch's validation outputs, from all ranks (a bird may be on any shard)."""
        if not self._panel_rows:
            raise RuntimeError("CAMPanel: the validation loop produced no batches")
        keys = list(self._panel_rows[0])
        columns = [torch.cat([rows[key] for rows in self._panel_rows]) for key in keys]
        return dict(zip(keys, _gather_unique(trainer, *columns)))

    # --- metrics -------------------------------------------------------------------------------------------------

    def _log_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     embeddings: tuple[Tensor, Tensor, Tensor] | None) -> None:
        """Per-image results in one row per subset slot, summed over ranks (a slot seen twice, e.g. by a padding
        duplicate of DistributedSampler, is averaged), then the four scores; identical on every rank."""
        num_hits = len(localization.DEFAULT_THRESHOLDS) * len(localization.DEFAULT_IOU_THRESHOLDS)
        rows = torch.zeros(len(self.subset), num_hits + 3, dtype=torch.float64)
        slot = {index: s for s, index in enumerate(self.subset)}
        stored = {key: torch.cat([part[key] for part in self._stored]) for key in self._stored[0]} \
            if self._stored else {}
        proxies = None
        if embeddings is not None and self.proxy == "normalized_mean":
            proxies = normalized_mean_proxies(embeddings[0], embeddings[1])
        workers = max(1, torch.get_num_threads() // trainer.num_devices)  # the cores this rank's loop uses
        for start in range(0, len(stored.get("index", [])), METRIC_CHUNK):
            part = {key: value[start:start + METRIC_CHUNK] for key, value in stored.items()}
            feature_maps, labels = part["feature_maps"].to(pl_module.device), part["label"].to(pl_module.device)
            if embeddings is None:  # GradCAM of the true class (the WSOL convention)
                maps = head_cams(pl_module, feature_maps, self._image_size, targets=labels)
            elif proxies is not None:  # EmbeddingCAM against the true class's proxy
                maps = head_cams(pl_module, feature_maps, self._image_size, proxies=proxies[labels])
            else:  # ... or against the nearest other validation image
                neighbours = nearest_other(embeddings, part["index"])
                maps = head_cams(pl_module, feature_maps, self._image_size,
                                 proxies=single_point_proxy(embeddings[0][neighbours]))
            maps, boxes = maps.float().cpu(), part["box"]
            values = [localization.box_hits(maps, boxes, workers=workers).reshape(len(maps), -1),
                      localization.heatmap_ratio(maps, boxes)[:, None],
                      localization.pointing_game(maps, boxes=boxes)[:, None], np.ones((len(maps), 1))]
            rows[[slot[int(i)] for i in part["index"]]] = torch.from_numpy(np.concatenate(values, 1).astype(np.float64))
        rows = trainer.strategy.reduce(rows.to(pl_module.device), reduce_op="sum").cpu()
        seen = rows[:, -1] > 0
        if not seen.any():
            _warn("no image of the metric subset was validated this epoch; CAM metrics skipped")
            return
        rows = rows[seen] / rows[seen, -1:]
        hit_counts = rows[:, :num_hits].sum(0).reshape(len(localization.DEFAULT_THRESHOLDS), -1).round()
        scores = localization.max_box_acc_from_hits(hit_counts.numpy(), int(seen.sum()))
        values = {"val/cam_max_box_acc": scores["max_box_acc"], "val/cam_box_acc_iou50": scores["box_acc_iou50"],
                  "val/cam_heatmap_ratio": rows[:, num_hits].mean().item(),
                  "val/cam_pointing_game": rows[:, num_hits + 1].mean().item()}
        for key, value in values.items():
            pl_module.log(key, float(value), sync_dist=True)
        self._box_threshold = scores["best_threshold_iou50"]  # the panel's CAM boxes: MaxBoxAcc's operating point

    # --- the panel -----------------------------------------------------------------------------------------------

    def _render_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, captured: dict[str, Tensor] | None,
                        embeddings: tuple[Tensor, Tensor, Tensor] | None) -> None:
        epoch = trainer.current_epoch
        try:
            strips, captions, names = self._render(trainer, pl_module, captured, embeddings)
        except Exception as err:  # a figure must never end a training run
            _warn(f"could not render the panel of epoch {epoch}: {type(err).__name__}: {err}")
            return
        for logger in trainer.loggers:
            if "wandb" in type(logger).__name__.lower():
                try:
                    log_wandb_panel(logger, strips, captions, names, trainer.global_step)
                except Exception as err:
                    _warn(f"could not log the panel of epoch {epoch} to {type(logger).__name__}: "
                          f"{type(err).__name__}: {err}")
        path = run_dir(trainer) / "cam_panels" / f"epoch_{epoch:03d}.png"
        try:
            save_png(grid([s.boxed for s in strips], captions, ncols=PANEL_COLUMNS), path)
        except Exception as err:
            _warn(f"could not write the panel of epoch {epoch} to {path}: {type(err).__name__}: {err}")

    def _render(self, trainer: pl.Trainer, pl_module: pl.LightningModule, captured: dict[str, Tensor] | None,
                embeddings: tuple[Tensor, Tensor, Tensor] | None) -> tuple[list[Strip], list[str], list[str]]:
        """The panel's strips, captions and class names (rank zero only)."""
        if not self.panel:
            raise RuntimeError("no panel was chosen (the validation run saw no images)")
        dataset = _val_dataset(trainer)
        birds = _panel_birds(captured, self.panel) if captured is not None else None
        if birds is None:  # the epoch that chose the panel (or one that skipped a bird): read and run them here
            birds = _load_birds(dataset, self.panel, pl_module)
        birds = {key: value.to(pl_module.device) for key, value in birds.items()}  # where the head runs
        birds.update(box=birds["box"].cpu(), label=birds["label"].cpu(), rgb=_to_rgb(dataset, birds["image"]))
        lines = [f"#{i}, epoch {trainer.current_epoch}" for i in self.panel]
        if embeddings is None:
            return self._classifier_panel(pl_module, birds, lines)
        if self.proxy == "normalized_mean":
            return self._proxy_panel(pl_module, dataset, birds, lines, embeddings)
        return self._neighbour_panel(pl_module, dataset, birds, lines, embeddings)

    def _classifier_panel(self, pl_module: pl.LightningModule, birds: dict[str, Any],
                          lines: list[str]) -> tuple[list[Strip], list[str], list[str]]:
        names = list(pl_module.class_names)
        probs = birds["output"].float().softmax(1)
        labels, predicted = birds["label"], probs.argmax(1)
        strips = self._two_class_strips(pl_module, birds, labels, predicted)
        captions = [f"{lines[b]}\ntrue: {name(names, t)} (p {probs[b, t]:.2f})\npred: {name(names, p)} "
                    f"(p {probs[b, p]:.2f})\n{'maps: true | predicted' if t != p else 'map: true = predicted'}"
                    for b, (t, p) in enumerate(zip(labels.tolist(), predicted.tolist()))]
        return strips, captions, names

    def _proxy_panel(self, pl_module: pl.LightningModule, dataset: Any, birds: dict[str, Any], lines: list[str],
                     embeddings: tuple[Tensor, Tensor, Tensor]) -> tuple[list[Strip], list[str], list[str]]:
        """EmbeddingCAM against the true class's Normalized Mean Proxy; "predicted" is the nearest proxy's class."""
        names = _val_names(dataset, pl_module)
        num_classes = max(len(names), int(embeddings[1].max()) + 1)
        proxies = normalized_mean_proxies(embeddings[0], embeddings[1], num_classes=num_classes)
        cosine = F.normalize(birds["output"].float(), dim=1) @ proxies.T.to(birds["output"].device)
        labels, predicted = birds["label"], cosine.argmax(1)
        strips = self._two_class_strips(pl_module, birds, labels, predicted, proxies)
        shown = {True: "map: true = nearest proxy", False: "maps: true | nearest proxy"}
        captions = [f"{lines[b]}\ntrue: {name(names, t)} (cos {cosine[b, t]:.2f})\npred: {name(names, p)} "
                    f"(cos {cosine[b, p]:.2f})\n{shown[t == p]}"
                    for b, (t, p) in enumerate(zip(labels.tolist(), predicted.tolist()))]
        return strips, captions, names

    def _two_class_strips(self, pl_module: pl.LightningModule, birds: dict[str, Any], labels: Tensor,
                          predicted: Tensor, proxies: Tensor | None = None) -> list[Strip]:
        """Each bird's map for the ``target`` class, then for the other class where the two differ (else the
        plain image): GradCAM of the class logit, or EmbeddingCAM of the class proxy."""
        primary, other = (labels, predicted) if self.target == "true" else (predicted, labels)
        size = tuple(birds["image"].shape[-2:])

        def maps(classes: Tensor) -> Tensor:
            classes = classes.to(birds["feature_maps"].device)
            if proxies is None:
                return head_cams(pl_module, birds["feature_maps"], size, targets=classes)
            return head_cams(pl_module, birds["feature_maps"], size, proxies=proxies.to(classes.device)[classes])

        primary_maps, other_maps = maps(primary).cpu(), maps(other).cpu()
        strips = []
        for b, (first, second, true) in enumerate(zip(primary.tolist(), other.tolist(), labels.tolist())):
            cells = [Cell(birds["rgb"][b], birds["box"][b], true, primary_maps[b], first),
                     Cell(birds["rgb"][b], birds["box"][b], true, other_maps[b] if first != second else None, second)]
            strips.append(render_strip(cells, self.colormap, self.alpha, self._box_threshold))
        return strips

    def _neighbour_panel(self, pl_module: pl.LightningModule, dataset: Any, birds: dict[str, Any], lines: list[str],
                         embeddings: tuple[Tensor, Tensor, Tensor]) -> tuple[list[Strip], list[str], list[str]]:
        """Single Point Proxy: each bird against its nearest other validation image, and that neighbour (read and
        run here) against the bird, side by side."""
        names = _val_names(dataset, pl_module)
        all_embeddings, _, all_index = embeddings
        rows = nearest_other(embeddings, torch.tensor(self.panel))
        neighbours = _load_birds(dataset, all_index[rows].tolist(), pl_module)
        neighbours["box"], neighbours["rgb"] = neighbours["box"].cpu(), _to_rgb(dataset, neighbours["image"])
        size = tuple(birds["image"].shape[-2:])
        device = birds["feature_maps"].device
        maps = head_cams(pl_module, birds["feature_maps"], size,
                         proxies=single_point_proxy(all_embeddings[rows]).to(device)).cpu()
        back = head_cams(pl_module, neighbours["feature_maps"], size,
                         proxies=single_point_proxy(birds["output"].float()).to(device)).cpu()
        similarity = (F.normalize(birds["output"].float(), dim=1).cpu()
                      * F.normalize(all_embeddings[rows].float(), dim=1).cpu()).sum(1)
        strips, captions = [], []
        for b, (true, other) in enumerate(zip(birds["label"].tolist(), neighbours["label"].tolist())):
            cells = [Cell(birds["rgb"][b], birds["box"][b], true, maps[b], other),
                     Cell(neighbours["rgb"][b], neighbours["box"][b], other, back[b], true)]
            strips.append(render_strip(cells, self.colormap, self.alpha, self._box_threshold))
            captions.append(f"{lines[b]}\ntrue: {name(names, true)}\nnearest #{int(all_index[rows[b]])}: "
                            f"{name(names, other)} (cos {similarity[b]:.2f})")
        return strips, captions, names


# --- shared pieces ---------------------------------------------------------------------------------------------


def nearest_other(embeddings: tuple[Tensor, Tensor, Tensor], index: Tensor) -> Tensor:
    """For each dataset index, the row of the most cosine-similar OTHER validation image in ``embeddings``."""
    all_embeddings, _, all_index = embeddings
    unit = F.normalize(all_embeddings.float(), dim=1)
    index = index.to(all_index.device)
    rows = torch.searchsorted(all_index, index).clamp(max=len(all_index) - 1)
    if not torch.equal(all_index[rows], index):
        raise ValueError("nearest_other: some indices have no embedding in this validation run")
    similarity = unit[rows] @ unit.T
    similarity[torch.arange(len(rows)), rows] = -torch.inf
    return similarity.argmax(1)


def log_wandb_panel(logger: Any, strips: list[Strip], captions: list[str], names: list[str], step: int) -> None:
    """One ``wandb.Image`` per strip under ``val/cam_panel``, with the GT and CAM boxes as W&B boxes.

    Each strip goes to W&B as a PNG written here at compression level 1: W&B encodes arrays at Pillow's default
    level 6, three times slower, and that encoding was a third of the callback's time on the demo. W&B copies the
    files while logging, so they can go with their temporary folder; only where the run may symlink media (the
    ``allow_media_symlink`` setting) does W&B get the arrays.
    """
    import wandb

    def log(sources: list[Any]) -> None:
        images = [wandb.Image(source, caption=caption, boxes=wandb_boxes(strip, names))
                  for source, strip, caption in zip(sources, strips, captions)]
        logger.log_metrics({PANEL_KEY: images}, step=step)

    if getattr(logger.experiment.settings, "allow_media_symlink", False):
        log([strip.pixels for strip in strips])
        return
    with tempfile.TemporaryDirectory(prefix="cubcam-panel-") as folder:
        log([str(save_png(strip.pixels, Path(folder) / f"{k:02d}.png")) for k, strip in enumerate(strips)])


def run_dir(trainer: pl.Trainer) -> Path:
    """Where Lightning's ModelCheckpoint puts ``checkpoints/`` by default, minus that last part."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version


def _val_dataset(trainer: pl.Trainer) -> Any:
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError("CAMPanel needs a map-style validation dataset (len() and dataset[i])")
    return dataset


def _rows(wanted: Tensor, index: Tensor, columns: dict[str, Tensor]) -> dict[str, Tensor]:
    """The rows of a batch whose dataset index is in ``wanted``, detached, on the CPU (possibly none)."""
    rows = torch.isin(index, wanted.to(index.device)).nonzero()[:, 0]
    return {key: value.detach()[rows.to(value.device)].cpu() for key, value in columns.items()}


def _panel_birds(captured: dict[str, Tensor], panel: list[int]) -> dict[str, Tensor] | None:
    """The gathered panel rows in panel order; None if the epoch skipped a bird (e.g. ``limit_val_batches``)."""
    where = {int(i): row for row, i in enumerate(captured["index"].tolist())}
    if any(i not in where for i in panel):
        return None
    order = torch.tensor([where[i] for i in panel])
    return {key: value[order.to(value.device)] for key, value in captured.items()}


def _load_birds(dataset: Any, indices: list[int], module: Any) -> dict[str, Tensor]:
    """The same columns for images read from the dataset and run through the module here."""
    items = [dataset[i] for i in indices]
    images = torch.stack([item["image"] for item in items]).to(module.device)
    feature_maps, outputs = features_and_outputs(module, images)
    return {"index": torch.tensor(indices), "image": images, "box": torch.stack([item["box"] for item in items]),
            "label": torch.tensor([int(item["label"]) for item in items]), "feature_maps": feature_maps,
            "output": outputs}


def _to_rgb(dataset: Any, images: Tensor) -> list[np.ndarray]:
    """Normalised images back to uint8 [H, W, 3] with the dataset's mean/std (ImageNet's if it has none)."""
    return list(denormalize(images, getattr(dataset, "mean", IMAGENET_MEAN), getattr(dataset, "std", IMAGENET_STD)))


def _val_names(dataset: Any, module: Any) -> list[str]:
    """Names of the validation labels: the dataset's (zero-shot splits have their own classes), else the model's."""
    return list(getattr(dataset, "class_names", None) or module.class_names)


def _gather_rows(trainer: pl.Trainer, local: Tensor) -> Tensor:
    """All ranks' rows concatenated (ranks may hold different counts: pad to the longest, gather, trim)."""
    if trainer.world_size == 1:
        return local
    strategy = trainer.strategy
    counts = strategy.all_gather(torch.tensor(len(local), device=strategy.root_device))
    padded = torch.zeros((int(counts.max()), *local.shape[1:]), dtype=local.dtype, device=strategy.root_device)
    padded[: len(local)] = local
    gathered = strategy.all_gather(padded)
    return torch.cat([rows[: int(n)] for rows, n in zip(gathered, counts)])


def _gather_unique(trainer: pl.Trainer, index: Tensor, *columns: Tensor) -> tuple[Tensor, ...]:
    """(index, *columns) of all ranks, sorted by dataset index, each index once (DistributedSampler pads ranks
    with repeated images)."""
    index, order = _gather_rows(trainer, index).sort(stable=True)
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    return (index[first], *(_gather_rows(trainer, column)[order][first] for column in columns))


@contextmanager
def _isolated(device: torch.device) -> Iterator[None]:
    """Gradients on, inference mode off, and every RNG training uses (torch CPU/CUDA, Python, NumPy) restored."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _warn(message: str) -> None:
    warnings.warn(f"CAMPanel: {message}", CAMPanelWarning, stacklevel=2)
