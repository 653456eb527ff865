"""The CUB-200-2011 LightningDataModule: train / "val" loaders, optional download, m-per-class batches.

CUB has no validation split, so ``val_dataloader`` (and ``test_dataloader``) serve the test split of the chosen
scheme, in order, through the evaluation transform: what the CAM callback and the checkpoint's val metrics see.

``sampler: m_per_class`` gives every training batch ``batch_size / m`` classes with ``m`` images each (what a
triplet miner needs), through pytorch-metric-learning's ``MPerClassSampler``. Under DDP each process builds its own
one, drawing with a rank-dependent seed: Lightning would otherwise wrap a custom sampler in its
``DistributedSamplerWrapper`` and deal the drawn indices round-robin to the ranks, which breaks the m-per-class
structure of every per-rank batch. The sampler subclasses ``DistributedSampler`` to tell Lightning that it already
is per-rank, so the trainer config needs nothing (``use_distributed_sampler`` stays true; the val loader still gets
Lightning's distributed sampler).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils import common_functions as pml_common
from torch.utils.data import DataLoader, DistributedSampler

from cubcam.train.data.cub import CUBDataset, find_root, split_class_names
from cubcam.train.data.download import CUB_MD5, CUB_URL, download_cub
from cubcam.train.data.presets import EvalPreset, TrainPreset

SAMPLERS = ("random", "m_per_class")


class DistributedMPerClassSampler(DistributedSampler):
    """pml's ``MPerClassSampler`` for one rank of ``num_replicas``: ``len(labels) // num_replicas`` indices
    (rounded down to whole batches) per epoch in m-per-class batches, drawn from a generator seeded with
    (seed, rank, epoch): reproducible, different on every rank and every epoch, and the same after a resume."""

    def __init__(self, labels: list[int], m: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(labels, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.labels = list(labels)
        self.m, self.batch_size = m, batch_size
        self.length = max(batch_size, len(labels) // num_replicas)

    def _pml_sampler(self) -> MPerClassSampler:
        return MPerClassSampler(self.labels, self.m, batch_size=self.batch_size, length_before_new_iter=self.length)

    def __iter__(self) -> Iterator[int]:
        # pml draws from the module-global ``NUMPY_RANDOM`` (numpy's global state): lend it our generator
        previous = pml_common.NUMPY_RANDOM
        pml_common.NUMPY_RANDOM = np.random.default_rng([self.seed, self.rank, self.epoch])
        try:
            indices = list(iter(self._pml_sampler()))  # drawn now, while our generator is in place
        finally:
            pml_common.NUMPY_RANDOM = previous
        return iter(indices)

    def __len__(self) -> int:
        return len(self._pml_sampler())


class CUBDataModule(pl.LightningDataModule):
    """CUB-200-2011 (or the synthetic stand-in) for ``cubcam fit``.

    ``root`` is the folder holding ``CUB_200_2011/`` (or that folder). ``num_classes`` and ``class_names`` (the
    classes the model is trained on) read ``classes.txt`` only, so the CLI can size the model before ``setup``.
    """

    def __init__(
        self,
        root: str = "data/synthetic_cub",
        split_scheme: str = "official",
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 2,
        sampler: str = "random",
        m_per_class: int = 4,
        download: bool = False,
        url: str = CUB_URL,
        skip_bad_images: bool = False,
    ):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if sampler == "m_per_class" and (m_per_class < 1 or batch_size % m_per_class):
            raise ValueError(
                f"sampler m_per_class needs batch_size ({batch_size}) to be a multiple of m_per_class ({m_per_class})"
            )
        self.save_hyperparameters()
        self.train_dataset: CUBDataset | None = None
        self.val_dataset: CUBDataset | None = None

    def _root(self) -> Path:
        if self.hparams.download:
            return download_cub(self.hparams.root, url=self.hparams.url, md5=CUB_MD5)
        return find_root(self.hparams.root)

    @property
    def class_names(self) -> list[str]:
        return split_class_names(self._root(), "train", self.hparams.split_scheme)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare_data(self) -> None:
        if self.hparams.download:
            self._root()

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        root = self._root()
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = CUBDataset(
                root, "train", hp.split_scheme, TrainPreset(hp.image_size), hp.skip_bad_images
            )
            self._check_m_per_class(self.train_dataset)
        if self.val_dataset is None:
            self.val_dataset = CUBDataset(root, "test", hp.split_scheme, EvalPreset(hp.image_size), hp.skip_bad_images)

    def _check_m_per_class(self, dataset: CUBDataset) -> None:
        hp = self.hparams
        if len(dataset) < hp.batch_size:
            raise ValueError(
                f"the training split holds {len(dataset)} images, fewer than one batch (batch_size {hp.batch_size})"
            )
        if hp.sampler == "m_per_class" and len(set(dataset.labels)) * hp.m_per_class < hp.batch_size:
            raise ValueError(
                f"batch_size {hp.batch_size} needs {hp.batch_size // hp.m_per_class} classes of "
                f"{hp.m_per_class} images, but the training split has {len(set(dataset.labels))} classes"
            )

    def _loader(self, dataset: CUBDataset, **kwargs: Any) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        if self.hparams.sampler == "random":
            # drop_last: a last batch of one image would break BatchNorm
            return self._loader(self.train_dataset, shuffle=True, drop_last=True)
        trainer = self.trainer
        sampler = DistributedMPerClassSampler(
            self.train_dataset.labels,
            self.hparams.m_per_class,
            self.hparams.batch_size,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            seed=torch.initial_seed() % 2**63,
        )  # seed_everything(k) makes this k on every rank
        return self._loader(self.train_dataset, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
