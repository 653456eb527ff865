"""The small net and images most engine tests explain."""

from __future__ import annotations

import pytest
import torch
from nets import SmallNet, trained_looking


@pytest.fixture
def net() -> SmallNet:
    torch.manual_seed(0)
    return trained_looking(SmallNet())


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
