"""The reference split of an embedding net: its embeddings, the class proxies built from them, and kNN retrieval.

EmbeddingCAM needs a proxy to score an embedding against (``cubcam.cams.targets.make_target`` builds it from these
embeddings), and retrieval needs a gallery; both come from the embeddings of a whole split. One pass over that
split costs as much as an evaluation, so the result is cached beside the checkpoint
(``<ckpt stem>.reference-<split>-<tag>.pt``), keyed by the checkpoint's content hash, the data root, the split and
its settings, and the image size: a retrained checkpoint or other data never reuse a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cubcam.cams.files import write_with
from cubcam.train.data.cub import CUBDataset, SplitSettings
from cubcam.train.data.presets import EvalPreset

CACHE_VERSION = 2  # 2: keyed by the split settings (val_fraction, seed)


@dataclass
class ReferenceSet:
    """L2-normalised embeddings [N, D] of a split, their labels [N], and the dataset they index."""

    embeddings: Tensor
    labels: Tensor
    dataset: CUBDataset
    split: str

    @property
    def num_classes(self) -> int:
        return len(self.dataset.class_names)

    def nearest(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` most cosine-similar reference images of each query: (similarities [Q, k], indices [Q, k])."""
        if not 1 <= k <= len(self.embeddings):
            raise ValueError(f"k must lie in [1, {len(self.embeddings)}], got {k}")
        return (F.normalize(queries.float(), dim=1) @ self.embeddings.T).topk(k, dim=1)


def loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """A plain, ordered loader: evaluation and reference passes never shuffle."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


@torch.inference_mode()
def embed(
    module: torch.nn.Module, data: DataLoader, device: torch.device, desc: str = "embedding"
) -> tuple[Tensor, Tensor]:
    """(L2-normalised embeddings [N, D], labels [N]) of every image of ``data``, on the CPU, in dataset order."""
    module.eval()
    embeddings, labels = [], []
    for batch in tqdm(data, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True):
        embeddings.append(F.normalize(module(batch["image"].to(device, non_blocking=True)).float(), dim=1).cpu())
        labels.append(batch["label"])
    return torch.cat(embeddings), torch.cat(labels)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content (what makes two checkpoints the same model; an mtime alone can lie)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_file(checkpoint: Path, key: dict) -> Path:
    """One cache per checkpoint file and data setting; the checkpoint's hash is checked inside, so a retrained
    ``last.ckpt`` replaces its stale cache instead of piling up new ones."""
    data = {k: v for k, v in key.items() if k != "checkpoint_sha256"}
    tag = hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    return checkpoint.with_name(f"{checkpoint.stem}.reference-{key['split']}-{tag}.pt")


def reference_set(
    module: torch.nn.Module,
    checkpoint: str | Path,
    root: str | Path,
    split: str = "train",
    settings: SplitSettings | None = None,
    image_size: int = 224,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    cache: bool = True,
) -> ReferenceSet:
    """Embeddings of ``split`` for the embedding net loaded from ``checkpoint``, from the cache when it matches."""
    checkpoint = Path(checkpoint)
    settings = settings or SplitSettings(split_scheme="official", val_fraction=0.0, seed=0)
    dataset = CUBDataset(root, split=split, transform=EvalPreset(image_size), **settings)
    key = {
        "version": CACHE_VERSION,
        "checkpoint_sha256": file_digest(checkpoint),
        "root": str(Path(root).resolve()),
        "split": split,
        **settings,
        "image_size": int(image_size),
        "num_images": len(dataset),
    }
    path = cache_file(checkpoint, key)
    if cache and path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.get("key") == key:
                return ReferenceSet(stored["embeddings"], stored["labels"], dataset, split)
        except (RuntimeError, EOFError, OSError, KeyError, AttributeError):
            pass  # a damaged cache is recomputed and overwritten
    embeddings, labels = embed(
        module, loader(dataset, batch_size, num_workers), torch.device(device), desc=f"reference embeddings ({split})"
    )
    if cache:
        try:
            stored = {"key": key, "embeddings": embeddings, "labels": labels}
            write_with(path, lambda file: torch.save(stored, file))
        except OSError as err:  # a read-only checkpoint folder only costs the next run another pass
            print(f"warning: could not cache reference embeddings at {path}: {err}", file=sys.stderr)
    return ReferenceSet(embeddings, labels, dataset, split)


def reference_split(split_scheme: str, requested: str | None = None, explained: str = "test") -> str:
    """The split whose embeddings make the proxies: the training split by default, but in the zero-shot scheme the
    split being explained (``val`` or ``test``; ``test`` for a training-split panel or the user's own images),
    whose classes were never trained on (its labels index other classes than the training split's)."""
    default = (explained if explained in ("val", "test") else "test") if split_scheme == "zero_shot" else "train"
    if requested is not None and split_scheme == "zero_shot" and requested != default:
        raise ValueError(
            f"in the zero_shot scheme the {default} classes have no training images: their proxies can only "
            f"come from the {default} split (--reference-split {default})"
        )
    return requested or default
