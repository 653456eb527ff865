"""Collecting: what one validation epoch hands the CAM panel, batch by batch, and gathered from every rank.

An :class:`EpochCollector` lives for one validation epoch: the callback makes a new one when the epoch starts and
drops it when the epoch ends, so nothing here depends on the phase the callback is in. What a batch hands over
comes from the callback's activation source (``sources.py``), the same rows for either kind of module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

from cubcam.callbacks.batches import CUBCAM_FORMAT, BatchFormat
from cubcam.cams.distributed import AllGather, gather_unique
from cubcam.cams.localization import check_boxes
from cubcam.cams.protocol import CAMStepOutput, Explainer

STEP_KEYS = tuple(CAMStepOutput.__annotations__)


@dataclass
class Outputs:
    """Every validation image's output (logits or embedding), label and dataset index, sorted by index."""

    index: Tensor
    output: Tensor
    label: Tensor


@dataclass
class EpochCollector:
    """The rows of one validation epoch the panel and the metrics need (on this rank, detached).

    ``panel`` and ``subset`` are dataset indices (the panel is None until chosen). Outputs are kept for every image
    only where the epoch needs them (``keep_outputs``: the panel is chosen from the labels seen, and an embedding
    net's proxies come from all embeddings), activations only for the panel and the metric subset. Everything stays
    on the device it came from, where the epoch's maps and metrics are made (``epoch_maps.py``).
    """

    panel: list[int] | None
    subset: list[int]
    keep_outputs: bool = True
    outputs: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)  # (output, label, index)
    panel_rows: list[dict[str, Tensor]] = field(default_factory=list)
    subset_rows: list[dict[str, Tensor]] = field(default_factory=list)
    image_size: tuple[int, int] = (0, 0)
    has_boxes: bool = True  # every batch so far came with boxes (a dataset without boxes gets no metrics)
    scoreable: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # per batch: (index, box can be scored)

    def __post_init__(self) -> None:
        # As tensors once, not per batch: torch.isin picks each batch's rows of the panel and the subset.
        self._panel_index = torch.tensor(self.panel or [], dtype=torch.long)
        self._subset_index = torch.tensor(self.subset, dtype=torch.long)

    def add(self, step: CAMStepOutput, images: Tensor, boxes: Tensor | None) -> None:
        """One validation batch: its step output, its images and its boxes (None: the data has none; the panel
        then draws none, with the empty box (0, 0, 0, 0))."""
        index, label = step["index"].detach(), step["label"].detach()
        if self.keep_outputs:
            self.outputs.append((step["output"].detach().float(), label, index))
        self.image_size = (int(images.shape[-2]), int(images.shape[-1]))
        self.has_boxes = self.has_boxes and boxes is not None
        box = torch.zeros(len(images), 4, device=images.device) if boxes is None else boxes.reshape(-1, 4)
        scored = index
        if boxes is not None:
            # Clipped to the image, and a box that cannot be scored (NaN, no size) is left out of the metrics by
            # name (the callback warns), instead of ending the run at the epoch's end or counting as a miss.
            # On the boxes' device and without a host sync: the indices are read once, at the epoch's end.
            height, width = self.image_size
            sizes = torch.tensor([[width, height]], dtype=torch.float64, device=box.device).expand(len(box), 2)
            clipped, valid, _ = check_boxes(box.detach(), sizes)
            box = torch.where(valid[:, None], clipped, torch.zeros_like(clipped)).to(box.dtype)
            valid = valid.to(index.device)
            scored = torch.where(valid, index, torch.full_like(index, -1))
            self.scoreable.append((index, valid))
        if self.panel is not None:  # kept even when empty: its shapes let every rank join the gather
            self.panel_rows.append(
                _rows(
                    self._panel_index,
                    index,
                    {
                        "index": index,
                        "image": images,
                        "box": box,
                        "label": label,
                        "activations": step["activations"],
                        "output": step["output"],
                    },
                )
            )
        if self.subset:
            rows = _rows(
                self._subset_index,
                scored,
                {
                    "index": index,
                    "activations": step["activations"],
                    "output": step["output"],
                    "box": box,
                    "label": label,
                },
            )
            if len(rows["index"]):
                self.subset_rows.append(rows)

    @property
    def invalid_boxes(self) -> list[int]:
        """Dataset indices of this rank's images whose box cannot be scored (left out of the metrics)."""
        if not self.scoreable:
            return []
        index, valid = (torch.cat(column).cpu() for column in zip(*self.scoreable))
        return index[~valid].tolist()

    def gathered_outputs(self, all_gather: AllGather, world_size: int, device: torch.device) -> Outputs | None:
        """All ranks' outputs, each dataset index once (a collective: every rank must call it); None where they were
        not kept (``keep_outputs``)."""
        if not self.keep_outputs:
            return None
        if not self.outputs:
            raise RuntimeError("the validation loop produced no batches")
        output, label, index = (torch.cat(parts).to(device) for parts in zip(*self.outputs))
        index, output, label = gather_unique(all_gather, world_size, index, output, label)
        return Outputs(index.cpu(), output.cpu(), label.cpu())

    def gathered_panel(self, all_gather: AllGather, world_size: int, device: torch.device) -> dict[str, Tensor] | None:
        """The panel birds' rows in panel order, from all ranks (a collective); None if the epoch skipped a bird
        (e.g. ``limit_val_batches``)."""
        if self.panel is None or not self.panel_rows:
            return None
        keys = list(self.panel_rows[0])
        columns = [torch.cat([rows[key] for rows in self.panel_rows]).to(device) for key in keys]
        captured = dict(zip(keys, gather_unique(all_gather, world_size, *columns)))
        where = {int(i): row for row, i in enumerate(captured["index"].tolist())}
        if any(i not in where for i in self.panel):
            return None
        order = torch.tensor([where[i] for i in self.panel], device=device)
        return {key: value[order] for key, value in captured.items()}

    def take_subset_columns(self) -> dict[str, Tensor]:
        """This rank's metric-subset rows (index, activations, output, box, label), concatenated; empty dict if
        none. The rows are let go once concatenated, so the device holds the subset's activations once, not twice
        (822 MB for 512 ResNet-50 maps at output stride 16), and they are freed with the maps made from them."""
        rows, self.subset_rows = self.subset_rows, []
        if not rows:
            return {}
        return {key: torch.cat([part[key] for part in rows]) for key in rows[0]}


Collate = Callable[[list[Any]], Any]  # a DataLoader's collate_fn: dataset items -> a batch


def read_items(
    dataset: Any,
    indices: list[int],
    device: torch.device,
    fmt: BatchFormat = CUBCAM_FORMAT,
    collate: Collate = default_collate,
) -> dict[str, Tensor]:
    """Dataset items as columns (``index``, ``image``, ``box``, ``label``), made a batch by the validation loader's
    own ``collate`` in one call, so that items and batches share one set of keys (a Hugging Face collate_fn makes
    ``labels`` of the items' ``label``); an image without a box gets the empty box (0, 0, 0, 0): none is drawn.

    Raises:
        TypeError: a collate that gives another count of images than items, or images that are not float (the
            message names it); a batch ``fmt`` does not fit.
    """
    batch = collate([dataset[i] for i in indices])
    images, labels, boxes = fmt.read(batch)
    what = f"the validation loader's collate_fn {getattr(collate, '__qualname__', type(collate).__name__)}"
    if len(images) != len(indices) or len(labels) != len(indices):
        raise TypeError(
            f"CAMPanel: {what} made {len(images)} images and {len(labels)} labels of {len(indices)} dataset items; "
            f"the panel reads its birds through it and needs one of each per item"
        )
    if not images.is_floating_point():
        raise TypeError(
            f"CAMPanel: {what} gives {images.dtype} images; the panel needs the float images the model is given"
        )
    return {
        "index": torch.tensor(indices, device=device),
        "image": images.to(device),
        "box": (torch.zeros(len(indices), 4) if boxes is None else boxes.reshape(-1, 4)).to(device),
        "label": labels.reshape(-1).long().to(device),
    }


def load_birds(
    dataset: Any,
    indices: list[int],
    explainer: Explainer,
    device: torch.device,
    fmt: BatchFormat = CUBCAM_FORMAT,
    collate: Collate = default_collate,
) -> dict[str, Tensor]:
    """The panel's columns for images read from the dataset (:func:`read_items`) and run forward here (the epoch
    that chooses the panel, or one that skipped a bird, and the nearest-image neighbours)."""
    birds = read_items(dataset, indices, device, fmt, collate)
    birds["activations"], birds["output"] = explainer.features_and_outputs(birds["image"])
    return birds


def _rows(wanted: Tensor, index: Tensor, columns: dict[str, Tensor]) -> dict[str, Tensor]:
    """The rows of a batch whose dataset index is in ``wanted``, detached, where they are (possibly none)."""
    rows = torch.isin(index, wanted.to(device=index.device, dtype=index.dtype)).nonzero()[:, 0]
    return {key: value.detach()[rows.to(value.device)] for key, value in columns.items()}
