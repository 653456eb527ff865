"""Fixtures every test folder shares: the synthetic CUB folders, a W&B-offline working folder, and the tiny
trained checkpoints (each built once per session)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import cubcam.cams  # noqa: F401  (installs the torchvision guard before the peer libraries import torchvision)
from cubcam.train.data.synthetic import make_synthetic_cub

CLI_SIZE = 64  # tiny_cub's image side, cli_runs.SIZE


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker gets its share of the cores as torch threads (workers x threads = cores)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# The longest files, first: pytest-xdist hands each worker whole files in collection order, so a long file collected
# last would leave one worker running it alone at the end (CI prints the slowest tests; keep this list to them).
LONGEST_FIRST = ("test_evaluate.py", "test_wheel.py", "test_explain.py", "test_train.py", "test_panel_ddp.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collection order with :data:`LONGEST_FIRST`'s files moved to the front (stable within and after them)."""
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def synthetic_cub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic CUB (4 classes x 8 images, 64 px; half of each class in the test split). Returns the folder
    that holds ``CUB_200_2011/`` (and ``segmentations/``); treat it as read-only."""
    return make_synthetic_cub(tmp_path_factory.mktemp("synthetic_cub"), classes=4, per_class=8, size=64, seed=0).parent


@pytest.fixture(scope="session")
def tiny_cub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``CUB_200_2011`` folder the ``cubcam fit`` tests train on (4 classes x 16 images, 64 px); read-only."""
    return make_synthetic_cub(tmp_path_factory.mktemp("cub"), classes=4, per_class=16, size=CLI_SIZE, seed=0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A tiny trained Classifier and EmbeddingNet checkpoint and their dataset (:mod:`trained_checkpoints`), trained
    once per xdist worker that needs them."""
    from trained_checkpoints import trained_checkpoints

    return trained_checkpoints(tmp_path_factory)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A working folder for a run: W&B offline and silent, the current directory, and ``sys.argv`` without
    pytest's arguments (``cubcam``'s ``main()`` gets its own from the test)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(sys, "argv", ["cubcam"])
    monkeypatch.chdir(tmp_path)
    return tmp_path
