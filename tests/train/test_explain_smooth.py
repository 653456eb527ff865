"""``cubcam explain --aug-smooth / --eigen-smooth``: the engine's smoothings (tested against pytorch-grad-cam in
tests/cams/test_pgc_habits.py) on a checkpoint, written as overlays; where they cannot apply, one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trained_checkpoints import SIZE, Trained

from cubcam.callbacks import CAMPanel
from cubcam.cams import GradCAM, overlay
from cubcam.cams.overlay import denormalize
from cubcam.train.data.cub import CUBDataset
from cubcam.train.data.presets import EvalPreset
from cubcam.train.inspection.checkpoint import load_checkpoint
from cubcam.train.inspection.explain import main as explain


@pytest.mark.parametrize("flag", ["--aug-smooth", "--eigen-smooth"])
def test_the_overlays_are_the_engine_s_smoothed_maps(flag: str, trained: Trained, tmp_path: Path) -> None:
    out = tmp_path / "out"
    explain([str(trained.classifier), "--split", "test", "--num", "3", flag, "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary[flag[2:].replace("-", "_")] is True
    module = load_checkpoint(trained.classifier).module
    test = CUBDataset(trained.root, split="test", transform=EvalPreset(SIZE))
    images = torch.stack([test[r["index"]]["image"] for r in summary["images"]])
    classes = torch.tensor([r["target"]["class"] for r in summary["images"]])
    smooth = {flag[2:].replace("-", "_"): True}
    maps = GradCAM(module, module.cam_target_layer)(images, classes, **smooth)
    plain = GradCAM(module, module.cam_target_layer)(images, classes)
    assert (maps - plain).abs().max() > 1e-2  # the flag changed the maps
    for record, image, cam in zip(summary["images"], images, maps):
        with Image.open(out / record["overlay"]) as written:
            assert np.abs(np.asarray(written).astype(int) - overlay(denormalize(image), cam)).max() <= 1


def test_what_cannot_be_smoothed_is_one_line(trained: Trained, tmp_path: Path, capsys) -> None:
    args = [str(trained.classifier), "--num", "1", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        explain([*args, "--method", "scorecam", "--eigen-smooth"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "error: --eigen-smooth smooths a gradient method's weighted activations; scorecam has none"
    with pytest.raises(ValueError, match="CAMPanel: aug_smooth runs the model on six views of every image"):
        CAMPanel(aug_smooth=True)
