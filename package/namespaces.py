"""Both Lightning namespaces: ``pytorch_lightning`` and ``lightning.pytorch`` (the ``lightning`` package, the one
Lightning's docs and examples teach).

They are two copies of one code base whose classes are distinct: a ``pytorch_lightning.Callback`` is no callback to
``lightning.pytorch``'s Trainer and LightningCLI (Lightning issue #20628), and a sink that matches one namespace's
``WandbLogger`` misses the other's. cubcam's callbacks therefore derive from both namespaces' classes (:func:`dual`;
the method resolution order puts ``pytorch_lightning``'s first, and both ``isinstance`` checks pass), and its sinks
match the loggers of either (:func:`in_both`). Without the ``lightning`` package, both are ``pytorch_lightning``'s
classes alone.
"""

from __future__ import annotations

import importlib


def twin(cls: type) -> type | None:
    """The ``lightning.pytorch`` class of a ``pytorch_lightning`` one (same module path and name), or None where
    the ``lightning`` package is not installed."""
    module = cls.__module__.replace("pytorch_lightning", "lightning.pytorch", 1)
    try:
        found = getattr(importlib.import_module(module), cls.__name__, None)
    except ImportError:
        return None
    return found if isinstance(found, type) and found is not cls else None


def in_both(cls: type) -> tuple[type, ...]:
    """``cls`` and its ``lightning.pytorch`` twin (where installed): for ``isinstance`` checks."""
    other = twin(cls)
    return (cls,) if other is None else (cls, other)


def dual(cls: type) -> type:
    """A class deriving from ``cls`` and its ``lightning.pytorch`` twin (``cls`` itself without ``lightning``), to
    derive cubcam's callbacks from. Its methods are ``cls``'s; the twin contributes its type."""
    bases = in_both(cls)
    return cls if len(bases) == 1 else type(cls.__name__, bases, {"__doc__": cls.__doc__, "__module__": __name__})
