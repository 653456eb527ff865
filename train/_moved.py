"""Old import paths kept for a deprecation cycle: a module that moved leaves a two-line stand-in whose attributes
come from the new place, each with a DeprecationWarning naming it."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable


def moved(old: str, new: str) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``old`` that serves every name from module ``new``."""

    def __getattr__(name: str) -> object:
        warnings.warn(f"{old} moved to {new}; import {name} from there", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)

    return __getattr__
