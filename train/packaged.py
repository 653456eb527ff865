"""The configs that ship inside the package (``cubcam.configs``, the repository's ``configs/`` folder): where they
are, and command lines that name them as if they were here (``cubcam fit --config demo/classifier.yaml``)."""

from __future__ import annotations

import difflib
from pathlib import Path

import cubcam


def config_root() -> Path:
    """The packaged configs' folder, ``cubcam/configs/`` (a wheel unpacks it; the strict editable install links
    it): a real folder, so that a model config's ``../shared/...`` references resolve."""
    return Path(cubcam.__file__).parent / "configs"


def packaged_configs(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config NAME`` (or ``-c NAME``) that is no file here but a packaged config
    (``demo/classifier.yaml``, ``trainer/tensorboard.yaml``, ...) pointing at the packaged file; the rest as is."""
    out, config = [], False
    for arg in argv:
        name, eq, value = arg.partition("=")
        if config or (eq and name == "--config"):
            candidate = value if eq else arg
            if not Path(candidate).exists() and (config_root() / candidate).is_file():
                arg = f"--config={config_root() / candidate}" if eq else str(config_root() / candidate)
        config = arg in ("--config", "-c")
        out.append(arg)
    return out


def missing_config(argv: list[str]) -> str | None:
    """One line for the first ``--config`` file that is neither here nor packaged, with the nearest names that
    exist (files under the working folder's ``configs/`` and the packaged configs); None when every one exists."""
    for index, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name not in ("--config", "-c") or (not eq and index + 1 == len(argv)):
            continue
        given = value if eq else argv[index + 1]
        if Path(given).exists() or any(mark in given for mark in ":{\n"):  # a file, or a config given inline
            continue
        known = [str(path) for path in Path("configs").rglob("*.yaml")] if Path("configs").is_dir() else []
        known += [str(path.relative_to(config_root())) for path in config_root().rglob("*.yaml")]
        near = difflib.get_close_matches(given, known, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(near)}?" if near else f"; cubcam's own: {', '.join(sorted(known)[:6])}"
        return f"error: --config {given}: no such file here or among cubcam's packaged configs{hint}"
    return None
