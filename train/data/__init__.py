"""CUB-200-2011 in its own file layout: the dataset, its transforms, the Lightning datamodule, the checked download
and a synthetic stand-in written in the same format (the demo's and the tests' data).

The names below are imported on first use, so ``python -m cubcam.train.data.synthetic`` does not load Lightning."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CUBDataset": "cub",
    "CUBDataModule": "datamodule",
    "download_cub": "download",
    "make_synthetic_cub": "synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
