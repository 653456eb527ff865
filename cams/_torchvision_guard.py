"""Let ``import torchvision`` work when its compiled ops cannot load (a CUDA torchvision wheel beside a CPU torch).

torchvision's ``_meta_registrations`` registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``
unconditionally; when ``_C.so`` fails to load those operators have no schema and the import (and with it
torchmetrics and Lightning) dies.  Declaring the two schemas is all it takes: cubcam decodes images with Pillow
and never calls torchvision's compiled ops.  This module only uses torch and must run before the first
``import torchvision``; it does nothing where the ops load, or where torchvision is absent or already imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: torch.library.Library | None = None  # kept alive: dropping it would unregister the schemas


def _compiled_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # nothing to repair
    for lib in Path(spec.origin).parent.glob("_C*.so"):
        try:
            torch.ops.load_library(str(lib))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def install() -> None:
    """Declare the missing schemas if, and only if, torchvision's compiled ops cannot load."""
    global _library
    if _library is not None or "torchvision" in sys.modules or _compiled_ops_load():
        return
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        with contextlib.suppress(RuntimeError):  # already declared elsewhere
            _library.define(schema)


install()
