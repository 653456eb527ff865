"""Small nets the engine's tests explain (tests/cams, tests/train): a CNN with a pooled linear head, its
penultimate features, and a way to give random weights a trained look."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class SmallNet(nn.Module):
    """conv-bn-relu ×2 → GAP → fc; ``features`` is the CAM layer, ``stem`` lies below it."""

    def __init__(self, num_classes: int = 5, dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.features = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(16, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.stem(x))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(f.mean((2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class Penultimate(nn.Module):
    """The same network without its fc layer: pooled features as an 'embedding'."""

    def __init__(self, net: SmallNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x).mean((2, 3))


def trained_looking(net: nn.Module) -> nn.Module:
    """Give BatchNorm non-trivial running statistics so eval mode differs from train mode."""
    torch.manual_seed(1)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, 32, 32))
    return net.eval()


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


class AsModule(nn.Module):
    """SmallNet as a CAM module (the protocol's three members)."""

    cam_kind = "classifier"
    cam_reshape = None

    def __init__(self, net: SmallNet):
        super().__init__()
        self.net = net

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.net.features

    def forward_head(self, activations: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
