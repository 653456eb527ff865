"""Reading a user's batches and dataset items: ``(images, labels[, boxes])`` tuples or lists, or dicts.

cubcam's own data gives dicts with ``image``, ``label`` and ``box`` (``[x, y, w, h]`` in the pixels of the image
tensor); a torchvision ``ImageFolder`` gives ``(image, label)`` tuples. :class:`BatchFormat` reads either, a batch
(stacked) or one dataset item, with the key names the user sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class BatchFormat:
    """Where the images, labels and (optional) boxes are: dict keys, or positions 0, 1, 2 of a tuple or list."""

    image_key: str = "image"
    label_key: str = "label"
    box_key: str = "box"

    def read(self, batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        """(images, labels, boxes or None) of a batch or of one dataset item, as tensors."""
        if isinstance(batch, Mapping):
            missing = [key for key in (self.image_key, self.label_key) if key not in batch]
            if missing:
                raise TypeError(
                    f"CAMPanel: the batch has no {missing} key (it has {sorted(batch)}); set image_key / label_key"
                )
            images, labels, boxes = batch[self.image_key], batch[self.label_key], batch.get(self.box_key)
        elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
            images, labels = batch[0], batch[1]
            boxes = batch[2] if len(batch) > 2 else None
        else:
            raise TypeError(
                f"CAMPanel: batches must be (images, labels[, boxes]) tuples or dicts, got {type(batch).__name__}"
            )
        if not isinstance(images, Tensor):
            raise TypeError(f"CAMPanel: images must be a tensor, got {type(images).__name__}")
        return images, torch.as_tensor(labels), None if boxes is None else torch.as_tensor(boxes, dtype=torch.float32)


CUBCAM_FORMAT = BatchFormat()  # cubcam's own dict batches
