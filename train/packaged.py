"""The configs that ship inside the package (``cubcam.configs``, the repository's ``configs/`` folder): where they
are, and command lines that name them as if they were here (``cubcam fit --config demo/classifier.yaml``)."""

from __future__ import annotations

from pathlib import Path

import cubcam


def config_root() -> Path:
    """The packaged configs' folder, ``cubcam/configs/`` (a wheel unpacks it; the strict editable install links
    it): a real folder, so that a model config's ``../shared/...`` references resolve."""
    return Path(cubcam.__file__).parent / "configs"


def packaged_configs(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config NAME`` that is no file here but a packaged config (``demo/classifier.yaml``,
    ``trainer/tensorboard.yaml``, ...) pointing at the packaged file; the rest as it is."""
    out, config = [], False
    for arg in argv:
        name, eq, value = arg.partition("=")
        if config or (eq and name == "--config"):
            candidate = value if eq else arg
            if not Path(candidate).exists() and (config_root() / candidate).is_file():
                arg = f"--config={config_root() / candidate}" if eq else str(config_root() / candidate)
        config = arg == "--config"
        out.append(arg)
    return out
