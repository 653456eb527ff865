"""CUBDataModule: m-per-class batches per rank, loaders in order, the held-out validation splits, impossible
batches refused."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from cubcam.train.data.cub import CUBDataset
from cubcam.train.data.datamodule import CUBDataModule, DistributedMPerClassSampler
from cubcam.train.data.synthetic import make_synthetic_cub

# These tests validate on the test split on purpose (val_fraction=0: every image of a tiny CUB counts).
pytestmark = pytest.mark.filterwarnings("ignore:val_fraction is 0:cubcam.CubcamWarning")


def test_m_per_class_batches_per_rank(synthetic_cub: Path) -> None:
    data = CUBDataModule(
        root=str(synthetic_cub),
        image_size=32,
        batch_size=4,
        num_workers=0,
        sampler="m_per_class",
        m_per_class=2,
        val_fraction=0.0,
    )
    data.setup("fit")
    torch.manual_seed(3)
    loader = data.train_dataloader()
    batches = [batch["label"].tolist() for batch in loader]
    assert len(batches) == len(data.train_dataset) // 4
    assert all(set(Counter(labels).values()) == {2} for labels in batches)

    labels = data.train_dataset.labels
    ranks = [DistributedMPerClassSampler(labels, m=2, batch_size=4, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    drawn = [list(sampler) for sampler in ranks]
    assert [len(d) for d in drawn] == [len(labels) // 2] * 2 and drawn[0] != drawn[1]
    for indices in drawn:
        for start in range(0, len(indices), 4):
            assert set(Counter(labels[i] for i in indices[start : start + 4]).values()) == {2}
    assert list(ranks[0]) == drawn[0]  # reproducible within an epoch ...
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != drawn[0]  # ... and new in the next
    # Lightning replaces no DistributedSampler: under DDP every rank keeps its own m-per-class sampler
    assert isinstance(loader.sampler, DistributedSampler)


def test_loaders_serve_val_and_test_in_order(synthetic_cub: Path) -> None:
    data = CUBDataModule(root=str(synthetic_cub), image_size=32, batch_size=5, num_workers=0)
    data.setup("validate")
    assert data.train_dataset is None and data.test_dataset is None and data.val_dataset.split == "val"
    ids = [i for batch in data.val_dataloader() for i in batch["image_id"].tolist()]
    assert ids == data.val_dataset.image_ids
    data.setup("test")
    assert data.test_dataset.split == "test"
    ids = [i for batch in data.test_dataloader() for i in batch["image_id"].tolist()]
    assert ids == CUBDataset(synthetic_cub, "test").image_ids
    boxes = next(iter(data.test_dataloader()))["box"]
    assert boxes.shape == (5, 4) and (boxes[:, 2:] > 0).all()


def test_without_a_val_fraction_validation_is_on_the_test_split_with_a_warning(synthetic_cub: Path) -> None:
    data = CUBDataModule(root=str(synthetic_cub), image_size=32, num_workers=0, val_fraction=0.0)
    with pytest.warns(UserWarning, match="val_fraction is 0: validating on the test split"):
        data.setup("validate")
    assert data.val_dataset.split == "test"
    with pytest.raises(ValueError, match="there is no val split: val_fraction is 0"):
        CUBDataset(synthetic_cub, "val")
    with pytest.raises(ValueError, match=r"val_fraction must lie in \[0, 1\)"):
        CUBDataModule(root=str(synthetic_cub), val_fraction=1.0)


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_official_val_split_holds_out_a_share_of_every_class_s_training_images(tmp_path: Path, fraction: float) -> None:
    root = make_synthetic_cub(tmp_path / "cub", classes=4, per_class=16, size=32, seed=0)  # 8 training images a class
    split = {name: CUBDataset(root, name, val_fraction=fraction, seed=3) for name in ("train", "val", "test")}
    official_train = CUBDataset(root, "train")
    assert not set(split["train"].image_ids) & set(split["val"].image_ids)
    assert sorted(split["train"].image_ids + split["val"].image_ids) == official_train.image_ids
    assert split["test"].image_ids == CUBDataset(root, "test").image_ids  # the test split never changes
    assert Counter(split["val"].labels) == dict.fromkeys(range(4), round(8 * fraction))  # stratified
    assert split["val"].class_names == split["train"].class_names == official_train.class_names
    again = CUBDataset(root, "val", val_fraction=fraction, seed=3)
    other = CUBDataset(root, "val", val_fraction=fraction, seed=4)
    assert again.image_ids == split["val"].image_ids != other.image_ids  # the seed draws it, reproducibly
    data = CUBDataModule(root=str(root), image_size=32, batch_size=8, num_workers=0, val_fraction=fraction, seed=3)
    data.setup(None)  # the datamodule's own seed: explain/evaluate rebuild the same split from its settings
    assert data.val_dataset.image_ids == split["val"].image_ids
    assert data.train_dataset.image_ids == split["train"].image_ids


def test_zero_shot_val_split_holds_out_whole_training_classes(tmp_path: Path) -> None:
    root = make_synthetic_cub(tmp_path / "cub", classes=10, per_class=4, size=32, seed=0)  # 5 training classes
    train = CUBDataset(root, "train", "zero_shot", val_fraction=0.4, seed=1)
    val = CUBDataset(root, "val", "zero_shot", val_fraction=0.4, seed=1)
    test = CUBDataset(root, "test", "zero_shot", val_fraction=0.4, seed=1)
    assert len(val.class_names) == 2 and len(train.class_names) == 3  # round(0.4 * 5) classes held out
    assert not set(train.class_names) & set(val.class_names)  # class-disjoint
    first_half = CUBDataset(root, "train", "zero_shot")
    assert sorted(train.class_names + val.class_names) == sorted(first_half.class_names)
    assert sorted(train.image_ids + val.image_ids) == first_half.image_ids  # every image of those classes
    assert test.class_names == CUBDataset(root, "test", "zero_shot").class_names
    assert sorted(set(train.labels)) == [0, 1, 2] and sorted(set(val.labels)) == [0, 1]  # re-based
    data = CUBDataModule(root=str(root), split_scheme="zero_shot", val_fraction=0.4, seed=1)
    assert data.class_names == train.class_names and data.num_classes == 3  # what the model is trained on


def test_datamodule_rejects_impossible_batches(synthetic_cub: Path) -> None:
    with pytest.raises(ValueError, match="multiple of m_per_class"):
        CUBDataModule(root=str(synthetic_cub), batch_size=6, sampler="m_per_class", m_per_class=4)
    data = CUBDataModule(root=str(synthetic_cub), batch_size=12, sampler="m_per_class", m_per_class=2)
    with pytest.raises(ValueError, match="6 classes of 2 images, but the training split has 4 classes"):
        data.setup("fit")
    with pytest.raises(ValueError, match="sampler must be one of"):
        CUBDataModule(root=str(synthetic_cub), sampler="balanced")
