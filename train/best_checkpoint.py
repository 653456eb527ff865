"""``BestCheckpoint``: Lightning's ModelCheckpoint that keeps the best epoch by the score the module names.

The classifier is best by ``val/acc``, the embedding net by ``val/precision_at_1``; each module says so in its
``monitor`` attribute. So one shared callback list (``configs/shared/callbacks.yaml``) serves every model, where
a list in a YAML file could only be replaced, never merged, per model.
"""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
import torch

from cubcam.train.run_folder import RunFolderCheckpoint


class BestCheckpoint(RunFolderCheckpoint):
    """``best-{epoch}.ckpt``: the best epoch so far by ``pl_module.monitor`` (a ``(key, "min" | "max")`` pair).

    Args:
        monitor, mode: given explicitly, they win over the module's; otherwise taken from it at ``setup``.
        **kwargs: ModelCheckpoint's own (``filename`` defaults to ``best-{epoch}``, ``save_top_k`` to 1), and
            :class:`~cubcam.train.run_folder.RunFolderCheckpoint`'s (one run folder, atomic writes).

    Raises:
        TypeError: at ``setup``, when neither ``monitor`` nor the module's ``monitor`` says what is best.
    """

    def __init__(
        self,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        filename: str = "best-{epoch}",
        save_top_k: int = 1,
        **kwargs: Any,
    ):
        super().__init__(monitor=monitor, mode=mode or "max", filename=filename, save_top_k=save_top_k, **kwargs)
        self._explicit_mode = mode is not None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor is None:
            monitor = getattr(pl_module, "monitor", None)
            if not (isinstance(monitor, tuple) and len(monitor) == 2):
                raise TypeError(
                    f"BestCheckpoint: give monitor=..., or a module with a monitor attribute such as "
                    f"('val/acc', 'max'); {type(pl_module).__name__} has none"
                )
            key, mode = monitor
            self.monitor = key
            if not self._explicit_mode:
                self.mode = mode
                self.kth_value = torch.tensor(torch.inf if mode == "min" else -torch.inf)
        super().setup(trainer, pl_module, stage)
