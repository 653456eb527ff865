"""Tiny trained checkpoints shared by the tools' tests (conftest's ``trained`` fixture).

Trains a Classifier and an EmbeddingNet (ResNet-18, output stride 16, 128 px) on a small synthetic CUB with a plain
Lightning ``Trainer`` and saves them with ``trainer.save_checkpoint``, so the files hold the datamodule's
hyper-parameters exactly as ``cubcam fit`` writes them. Built once per pytest session, whichever file asks first.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytorch_lightning as pl

from cubcam import CubcamWarning
from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.data.synthetic import make_synthetic_cub
from cubcam.train.modules import Classifier, EmbeddingNet

# 8x8 CAMs, as in the demo: with 4x4 (64 px) or 6x6 (96 px) maps the synthetic birds, which fill most of the crop,
# are boxed barely better than by the centre prior, and whether a few-epoch model beats it depends on the seed.
SIZE = 128
CLASSES, PER_CLASS = 4, 12  # CUB's split file puts half of each class in test: 24 test images
EPOCHS = {"classifier": 10, "embedding": 4}


@dataclass(frozen=True)
class Trained:
    root: Path  # the folder holding CUB_200_2011
    classifier: Path
    embedding: Path


_built: dict[str, Trained] = {}


def fit(make: Callable[[], pl.LightningModule], data: CUBDataModule, epochs: int, path: Path) -> Path:
    pl.seed_everything(0, verbose=False)  # before the module exists: its initial weights are part of the run
    module = make()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    with warnings.catch_warnings():  # val_fraction=0 on purpose: the tools score the test split, as the demo's do
        warnings.filterwarnings("ignore", "val_fraction is 0", CubcamWarning)
        trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(path)
    return path


def trained_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The two checkpoints and their dataset, trained on first use in this session (about 45 s on 2 busy cores)."""
    if "trained" not in _built:
        base = tmp_path_factory.mktemp("trained")
        root = make_synthetic_cub(base / "cub", classes=CLASSES, per_class=PER_CLASS, size=96, seed=0).parent
        common = dict(root=str(root), image_size=SIZE, batch_size=8, num_workers=0, val_fraction=0.0)  # test = val
        data = CUBDataModule(**common)
        names = dict(num_classes=data.num_classes, class_names=data.class_names)
        _built["trained"] = Trained(
            root=root,
            classifier=fit(
                lambda: Classifier(arch="resnet18", output_stride=16, lr=2e-3, **names),
                data,
                EPOCHS["classifier"],
                base / "classifier.ckpt",
            ),
            embedding=fit(
                lambda: EmbeddingNet(arch="resnet18", output_stride=16, embedding_dim=32, lr=2e-3, **names),
                CUBDataModule(**common, sampler="m_per_class", m_per_class=4),
                EPOCHS["embedding"],
                base / "embedding.ckpt",
            ),
        )
    return _built["trained"]
