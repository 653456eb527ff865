"""cubcam: train CUB-200-2011 models with Lightning and watch what they look at (GradCAM, EmbeddingCAM).

The package's subpackages live in the repository's top-level folders (``cams/``, ``callbacks/``, ``train/``,
mapped by ``[tool.setuptools.package-dir]``); this root runs the torchvision guard, so ``import cubcam`` alone
makes ``import torchvision`` safe where its compiled ops cannot load.
"""

from cubcam.cams import _torchvision_guard  # noqa: F401  (before anything imports torchvision)


class CubcamWarning(UserWarning):
    """The base of every warning cubcam gives: something went wrong that a run survives (a panel not logged, an
    image skipped, a config value a resume ignores). Filter them as one: ``-W error::cubcam.CubcamWarning``."""
