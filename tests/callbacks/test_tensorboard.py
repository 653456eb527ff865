"""The panel in TensorBoard, through ``cubcam fit`` with ``--config configs/trainer/tensorboard.yaml``, read back with
TensorBoard's own ``EventAccumulator``: one ``val/cam_panel`` image per epoch at that epoch's step, the CAM scalars,
the evolution at the end, and a resume that continues the same version folder and the same evolution."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_runs import SIZE, fit_args
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cubcam.callbacks.sinks import EVOLUTION_KEY, PANEL_KEY
from cubcam.train.cli import main
from cubcam.train.data.synthetic import make_synthetic_cub


@pytest.fixture(scope="module")
def small_cub(tmp_path_factory) -> Path:
    """A smaller CUB than the shared tiny_cub: 8 images a class."""
    return make_synthetic_cub(tmp_path_factory.mktemp("cub"), classes=4, per_class=8, size=SIZE, seed=0)


def decoded(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


@pytest.mark.parametrize("config", ["demo/classifier.yaml", "demo/embedding.yaml"])
def test_tensorboard_shows_the_panel_every_epoch_and_a_resume_continues_it(config, small_cub, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cubcam"])
    monkeypatch.chdir(tmp_path)
    configs = [config, "trainer/tensorboard.yaml"]
    main(fit_args(configs, small_cub, tmp_path, "first", "--trainer.max_epochs", "1"))
    (version,) = (tmp_path / "runs" / "tensorboard").glob("version_*")
    main(
        fit_args(
            configs,
            small_cub,
            tmp_path,
            "resumed",
            "--trainer.max_epochs",
            "2",
            "--ckpt_path",
            str(version / "checkpoints" / "last.ckpt"),
        )
    )
    assert list((tmp_path / "runs" / "tensorboard").glob("version_*")) == [version]  # the same folder

    events = EventAccumulator(str(version), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    panels, scores = events.Images(PANEL_KEY), events.Scalars("val/cam_max_box_acc")
    assert [p.step for p in panels] == [s.step for s in scores] and len(panels) == 2  # one per epoch, at its step
    assert panels[0].step < panels[1].step
    for event in panels:
        pixels = decoded(event)
        assert pixels.shape == (event.height, event.width, 3) and pixels.std() > 10
    assert all(0 <= s.value <= 1 for s in scores)
    assert len(events.Scalars("val/cam_pointing_game")) == 2
    first, resumed = (decoded(e) for e in events.Images(EVOLUTION_KEY))  # one at the end of each fit
    assert resumed.shape[1] > first.shape[1]  # two thumbnails per bird after the resume, one before
    assert (version / "cam_panels" / "evolution.gif").is_file()
