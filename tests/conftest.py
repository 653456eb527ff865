from pathlib import Path

import pytest

import cubcam.cams  # noqa: F401  (installs the torchvision guard before the peer libraries import torchvision)
from cubcam.train.data.synthetic import make_synthetic_cub


@pytest.fixture(scope="session")
def synthetic_cub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic CUB (4 classes x 8 images, 64 px; half of each class in the test split), built once per
    session. Returns the folder that holds ``CUB_200_2011/`` (and ``segmentations/``); treat it as read-only."""
    return make_synthetic_cub(tmp_path_factory.mktemp("synthetic_cub"), classes=4, per_class=8, size=64, seed=0).parent
