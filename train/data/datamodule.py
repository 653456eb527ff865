"""The CUB-200-2011 LightningDataModule: train / val / test loaders, optional download, m-per-class batches.

CUB has no validation split: ``val_fraction`` (default 0.1) of the training images (``official``) or classes
(``zero_shot``) is held out as one, drawn with ``seed`` (see ``cubcam.train.data.cub``), so that checkpoint
selection, the CAM panel and the per-epoch metrics never see a test image; ``test_dataloader`` serves the test
split, which ``cubcam fit`` scores once at the end with the best checkpoint. ``val_fraction: 0`` validates on the
test split instead, with a warning (the way results on CUB were often, wrongly, selected). Evaluation loaders keep
dataset order and use the evaluation transform.

``sampler: m_per_class`` gives every training batch ``batch_size / m`` classes with ``m`` images each (what a
triplet miner needs), through pytorch-metric-learning's ``MPerClassSampler``. Under DDP each process builds its own
one, drawing with a rank-dependent seed: Lightning would otherwise wrap a custom sampler in its
``DistributedSamplerWrapper`` and deal the drawn indices round-robin to the ranks, which breaks the m-per-class
structure of every per-rank batch. The sampler subclasses ``DistributedSampler`` to tell Lightning that it already
is per-rank, so the trainer config needs nothing (``use_distributed_sampler`` stays true; the val loader still gets
Lightning's distributed sampler).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils import common_functions as pml_common
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cubcam import CubcamWarning
from cubcam.train.data.cub import CUBDataset, find_root, split_class_names
from cubcam.train.data.download import CUB_MD5, CUB_URL, download_cub
from cubcam.train.data.presets import EvalPreset, TrainPreset

SAMPLERS = ("random", "m_per_class")


class DistributedMPerClassSampler(DistributedSampler):
    """pml's ``MPerClassSampler`` for one rank of ``num_replicas``: ``len(labels) // num_replicas`` indices
    (rounded down to whole batches) per epoch in m-per-class batches, drawn from a generator seeded with
    (seed, rank, epoch): reproducible, different on every rank and every epoch, and the same after a resume."""

    def __init__(self, labels: list[int], m: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        # The sampler's dataset is only ever len()'d, and the labels have the dataset's length.
        super().__init__(cast(Dataset, labels), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
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
        val_fraction: float = 0.1,
        seed: int = 0,
    ):
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if sampler == "m_per_class" and (m_per_class < 1 or batch_size % m_per_class):
            raise ValueError(
                f"sampler m_per_class needs batch_size ({batch_size}) to be a multiple of m_per_class ({m_per_class})"
            )
        self.save_hyperparameters()  # for checkpoints (the tools read the data settings from there)
        # The same values, typed, for the code below.
        self.root, self.split_scheme, self.image_size, self.url = root, split_scheme, image_size, url
        self.batch_size, self.num_workers, self.sampler, self.m_per_class = (
            batch_size,
            num_workers,
            sampler,
            m_per_class,
        )
        self.download, self.skip_bad_images, self.val_fraction, self.seed = (
            download,
            skip_bad_images,
            val_fraction,
            seed,
        )
        self.train_dataset: CUBDataset | None = None
        self.val_dataset: CUBDataset | None = None
        self.test_dataset: CUBDataset | None = None

    def _root(self) -> Path:
        if self.download:
            return download_cub(self.root, url=self.url, md5=CUB_MD5)
        return find_root(self.root)

    @property
    def class_names(self) -> list[str]:
        return split_class_names(self._root(), "train", self.split_scheme, self.val_fraction, self.seed)

    @property
    def val_split(self) -> str:
        """The split the val loader serves: ``val``, or ``test`` when ``val_fraction`` is 0."""
        return "val" if self.val_fraction > 0 else "test"

    def _dataset(self, split: str, train: bool = False) -> CUBDataset:
        preset = TrainPreset(self.image_size) if train else EvalPreset(self.image_size)
        return CUBDataset(
            self._root(),
            split,
            self.split_scheme,
            preset,
            self.skip_bad_images,
            val_fraction=self.val_fraction,
            seed=self.seed,
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare_data(self) -> None:
        if self.download:
            self._root()

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset("train", train=True)
            self._check_m_per_class(self.train_dataset)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            if self.val_split == "test":
                warnings.warn(
                    "val_fraction is 0: validating on the test split, so checkpoint selection and the CAM metrics "
                    "see test images; set data.val_fraction (e.g. 0.1) to hold out a validation split",
                    CubcamWarning,
                    stacklevel=2,
                )
            self.val_dataset = self._dataset(self.val_split)
        if stage in (None, "test") and self.test_dataset is None:
            self.test_dataset = self._dataset("test")

    def _check_m_per_class(self, dataset: CUBDataset) -> None:
        if len(dataset) < self.batch_size:
            raise ValueError(
                f"the training split holds {len(dataset)} images, fewer than one batch (batch_size {self.batch_size})"
            )
        if self.sampler == "m_per_class" and len(set(dataset.labels)) * self.m_per_class < self.batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} needs {self.batch_size // self.m_per_class} classes of "
                f"{self.m_per_class} images, but the training split has {len(set(dataset.labels))} classes"
            )

    def _loader(self, dataset: CUBDataset | None, **kwargs: Any) -> DataLoader:
        if dataset is None:
            raise RuntimeError("CUBDataModule: call setup() before asking for a loader")
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        if self.sampler == "random":
            # drop_last: a last batch of one image would break BatchNorm
            return self._loader(self.train_dataset, shuffle=True, drop_last=True)
        trainer, dataset = self.trainer, self.train_dataset
        if dataset is None:
            raise RuntimeError("CUBDataModule: call setup() before asking for a loader")
        sampler = DistributedMPerClassSampler(
            dataset.labels,
            self.m_per_class,
            self.batch_size,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            seed=torch.initial_seed() % 2**63,
        )  # seed_everything(k) makes this k on every rank
        return self._loader(dataset, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)
