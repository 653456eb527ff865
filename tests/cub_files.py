"""Reading and copying a CUB-format folder in the data tests (tests/train)."""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from cubcam.train.data.cub import CUBDataset


def table(root: Path, name: str) -> dict[int, list[str]]:
    lines = (root / "CUB_200_2011" / name).read_text().splitlines()
    return {int(line.split()[0]): line.split()[1:] for line in lines}


def copy_of(synthetic_cub: Path, tmp_path: Path) -> Path:
    shutil.copytree(synthetic_cub, tmp_path / "cub")
    return tmp_path / "cub"


def mask_of(dataset: CUBDataset, index: int) -> Image.Image:
    """The drawn bird's mask (``<out>/segmentations/<class>/<file>.png``, CUB's segmentation layout) as RGB."""
    path = dataset.image_path(index)
    return Image.open(dataset.root.parent / "segmentations" / path.parent.name / f"{path.stem}.png").convert("RGB")
