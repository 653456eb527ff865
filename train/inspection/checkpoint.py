"""Open a Lightning checkpoint of either cubcam model, without unpickling arbitrary objects.

``cubcam explain`` and ``cubcam evaluate`` get checkpoints from users, so every failure mode (missing file, a file
that is no checkpoint, a checkpoint of some other model, weights that do not fit) ends in one
:class:`CheckpointError` whose message is one line naming the file and the problem.
"""

from __future__ import annotations

import inspect
import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cubcam.train.data.cub import SplitSettings
from cubcam.train.modules import Classifier, CUBModule, EmbeddingNet

MODULE_CLASSES: dict[str, type[CUBModule]] = {
    "cubcam.train.modules.Classifier": Classifier,
    "cubcam.train.modules.EmbeddingNet": EmbeddingNet,
}
COMPILED = "_orig_mod."  # what torch.compile's OptimizedModule adds to the names of the module it wraps


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line."""


@dataclass
class LoadedCheckpoint:
    """The module (eval mode, on ``map_location``) and the datamodule settings it was trained with.

    ``data_hparams`` is Lightning's ``datamodule_hyper_parameters`` (root, image_size, split_scheme, ...; empty when
    the checkpoint was saved without a datamodule), so the tools can default to the data the model was trained on.
    """

    path: Path
    module: CUBModule
    data_hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.data_hparams.get("image_size", 224))

    @property
    def split_scheme(self) -> str:
        return str(self.data_hparams.get("split_scheme", "official"))

    def split_settings(self, split_scheme: str | None = None) -> SplitSettings:
        """The splits the model was trained on (``split_scheme`` overrides the scheme). A checkpoint saved before
        ``val_fraction`` existed, or without a datamodule, had no validation split: 0."""
        hp = self.data_hparams
        return SplitSettings(
            split_scheme=split_scheme or self.split_scheme,
            val_fraction=float(hp.get("val_fraction", 0.0)),
            seed=int(hp.get("seed", 0)),
        )

    def default_split(self) -> str:
        """``val`` when the checkpoint's data held one out, else ``test``."""
        return "val" if self.split_settings()["val_fraction"] > 0 else "test"


def one_line(text: object) -> str:
    """Collapse a (possibly multi-line) message into one line, at most 300 characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= 300 else line[:297] + "..."


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's dict, memory-mapped (cheap even for big files), tensors and plain containers only.

    Raises:
        CheckpointError: no such file, or one that is not a Lightning checkpoint, said in the file's terms (empty,
            cut short, a web page, another pickle) rather than torch's.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} " + ("is not a file" if path.exists() else "does not exist"))
    with path.open("rb") as file:
        head = file.read(16)
    zipped = zipfile.is_zipfile(path)  # what torch.save writes; only such a file can be memory-mapped
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a copy or save that never finished?")
    if head.startswith(b"PK") and not zipped:
        raise CheckpointError(
            f"checkpoint {path} is cut short or damaged (a zip archive without its index): a copy, download or save "
            "that did not finish?"
        )
    if not zipped and not head.startswith(LEGACY_TORCH):
        raise CheckpointError(not_torch(path, head))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise CheckpointError(
                f"checkpoint {path} holds Python objects other than tensors and plain containers; "
                f"refusing to unpickle them (weights_only=True)"
            ) from err
        raise CheckpointError(damaged(path, err)) from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise CheckpointError(damaged(path, err)) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return checkpoint


LEGACY_TORCH = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # torch.save's non-zip format, begun


def not_torch(path: Path, head: bytes) -> str:
    """One line for a file that is neither of torch.save's formats: the bytes it begins with (a web page saved by a
    failed download begins with ``<``)."""
    page = " (a web page: a download that failed?)" if head.lstrip().startswith(b"<") else ""
    return f"checkpoint {path} is not a file torch.save wrote: it begins {head!r}{page}"


def damaged(path: Path, error: BaseException) -> str:
    """One line for a file in torch.save's format that ``torch.load`` cannot read."""
    return f"checkpoint {path} is damaged, or a zip archive torch.save did not write ({one_line(error)})"


def module_class(hparams: dict[str, Any], path: str | Path = "checkpoint") -> type[CUBModule]:
    """The cubcam module a checkpoint's hyper-parameters belong to.

    ``cubcam fit`` (LightningCLI) stores the class path; a module saved by a plain ``Trainer`` does not, and is
    recognised by its hyper-parameter names: exactly one of the two constructors must accept all of them.
    """
    class_path = hparams.get("_class_path")
    if class_path is not None:
        if class_path not in MODULE_CLASSES:
            raise CheckpointError(f"{path} is a checkpoint of {class_path}, not of a cubcam Classifier or EmbeddingNet")
        return MODULE_CLASSES[class_path]
    names = {key for key in hparams if not key.startswith("_")}
    fitting = [cls for cls in MODULE_CLASSES.values() if names <= init_arguments(cls)]
    if len(fitting) != 1:
        shown = ", ".join(sorted(names)[:8]) or "none"
        raise CheckpointError(
            f"{path} is a checkpoint of another model: its hyper-parameters ({shown}) fit "
            f"{'neither' if not fitting else 'both'} Classifier and EmbeddingNet"
        )
    return fitting[0]


def init_arguments(cls: type) -> set[str]:
    """The names a class's constructor takes, including those its ``**kwargs`` hand to its bases' (as
    ``Classifier`` hands the network arguments to ``CUBModule``)."""
    names: set[str] = set()
    for base in cls.__mro__:
        if "__init__" in vars(base) and base is not object:
            parameters = inspect.signature(vars(base)["__init__"]).parameters.values()
            names |= {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
            if not any(p.kind == p.VAR_KEYWORD for p in parameters):
                break
    return names


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a Classifier or EmbeddingNet checkpoint, in eval mode, on ``map_location``."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or not hparams:
        raise CheckpointError(f"{path} has no saved hyper-parameters; is it a cubcam checkpoint?")
    cls = module_class(hparams, path)
    data_hparams = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    source: Path | io.BytesIO = path  # load_from_checkpoint reads the file itself, unless its names need fixing
    weights = checkpoint.get("state_dict") or {}
    if any(COMPILED in key for key in weights):  # a run whose net was torch.compile'd
        checkpoint["state_dict"] = {key.replace(COMPILED, ""): value for key, value in weights.items()}
        source = io.BytesIO()
        torch.save(checkpoint, source)
        source.seek(0)
    del checkpoint  # the memory map
    try:
        module = cls.load_from_checkpoint(source, map_location=map_location, weights_only=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} does not load as a {cls.__name__}: {one_line(err)}") from err
    return LoadedCheckpoint(path=path, module=module.eval(), data_hparams=data_hparams)
