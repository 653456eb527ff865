"""Finer-CAM in CAMPanel: a third cell for the birds the model gets wrong (their true class minus the predicted one),
or for every bird against its nearest rivals; the engine's FinerCAM maps, drawn and tabled."""

from __future__ import annotations

import cubcam.cams  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from nets import AsModule, SmallNet, trained_looking
from panel_runs import TILE, data_for, finished_run, module_for, panel_rows, trainer_for, wandb_logger
from PIL import Image

from cubcam.callbacks import CAMPanel
from cubcam.callbacks.panel_render import Style, class_inputs, class_panel
from cubcam.callbacks.sinks import PANEL_KEY, TABLE_COLUMNS, TABLE_KEY
from cubcam.cams import FinerCAM
from cubcam.cams.figure import GAP
from cubcam.cams.protocol import HeadExplainer
from cubcam.cams.targets import make_target

pytestmark = pytest.mark.filterwarnings("ignore:val_fraction is 0:cubcam.CubcamWarning")


def birds_of(module: AsModule, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    images = torch.randn(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(3))
    activations, output = HeadExplainer(module).features_and_outputs(images)
    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0]]).expand(len(labels), -1)
    return {"index": torch.arange(len(labels)), "image": images, "box": boxes, "label": labels} | {
        "activations": activations,
        "output": output,
    }


def test_wrong_birds_get_the_true_class_minus_the_predicted_one_and_every_bird_its_nearest():
    torch.manual_seed(0)
    net = trained_looking(SmallNet())
    module = AsModule(net)
    with torch.no_grad():
        predicted = net(birds_of(module, torch.zeros(6, dtype=torch.long))["image"]).argmax(1)
    labels = predicted.clone()
    labels[[1, 4]] = (predicted[[1, 4]] + 1) % 5  # two birds the model gets wrong
    birds = birds_of(module, labels)
    target = make_target("classifier")
    raw = {"upsample": False, "normalize": False}

    wrong = class_inputs(HeadExplainer(module), birds, target, "true", "gradcam", "wrong")
    assert wrong["finer_drawn"].tolist() == (labels != predicted).tolist()
    expected = FinerCAM(net, "features")(birds["image"], labels, rivals=predicted[:, None], **raw)
    torch.testing.assert_close(wrong["finer"], expected)

    every = class_inputs(HeadExplainer(module), birds, target, "true", "gradcam", "every")
    assert every["finer_drawn"].all() and every["finer_rows"].shape == (6, 4)
    torch.testing.assert_close(every["finer"], FinerCAM(net, "features")(birds["image"], labels, **raw))

    rgb = [np.full((32, 32, 3), 128, np.uint8)] * 6
    names = [f"class {c}" for c in range(5)]
    drawn = class_panel(wrong, rgb, "true", "p", 0, names, Style())
    assert {strip.boxed.shape[1] for strip in drawn.strips} == {3 * 32 + 2 * GAP}  # three cells on every strip
    assert [("Finer-CAM" in caption) for caption in drawn.captions] == (labels != predicted).tolist()
    assert [row["finer_heatmap_ratio"] is not None for row in drawn.rows] == (labels != predicted).tolist()
    assert all(np.all(strip.boxed[:, -32:] == 255) for strip, w in zip(drawn.strips, labels == predicted) if w)
    # The PNG says what the cells mean, in a banner above the grid (W&B's grid keeps its geometry for its boxes).
    assert "3rd: Finer-CAM, what tells the true class apart from the predicted one" in drawn.legend
    banner = drawn.grid.shape[0] - drawn.plain_grid.shape[0]
    assert banner > 10 and drawn.grid[:banner].min() < 128 and drawn.grid.shape[1] == drawn.plain_grid.shape[1]
    assert "its 3 nearest classes'" in class_panel(every, rgb, "true", "p", 0, names, Style()).legend
    all_wrong = birds_of(module, (predicted + 1) % 5)  # every bird wrong: still the wrong birds' legend
    inputs = class_inputs(HeadExplainer(module), all_wrong, target, "true", "gradcam", "wrong")
    assert "apart from the predicted one" in class_panel(inputs, rgb, "true", "p", 0, names, Style()).legend

    one_logit = {**birds, "output": birds["output"][:, :1]}  # a binary head: no rival to subtract, no Finer-CAM
    assert "finer" not in class_inputs(HeadExplainer(module), one_logit, target, "true", "gradcam", "every")


def test_finer_every_bird_reaches_the_wandb_table_and_the_grid(synthetic_cub, offline):
    data = data_for(synthetic_cub, "classifier")
    logger = wandb_logger(offline)
    panel = CAMPanel(num_images=4, finer="every")
    pl.seed_everything(0, verbose=False)
    trainer_for(offline, 1, [panel], logger=logger).validate(
        module_for("classifier", data), datamodule=data, verbose=False
    )
    run_dir = finished_run(logger)
    (row,) = panel_rows(run_dir)
    media = row[PANEL_KEY]
    assert media["width"] == 4 + 4 * (3 * TILE + 2 * GAP + 4)  # four strips of three cells
    pixels = np.asarray(Image.open(run_dir / "files" / media["path"]).convert("RGB"))
    assert pixels.std() > 10
    table = json.loads((run_dir / "files" / row[TABLE_KEY]["path"]).read_text())
    columns = {name: [r[k] for r in table["data"]] for k, name in enumerate(TABLE_COLUMNS)}
    assert all(0 <= v <= 1 for v in columns["finer_heatmap_ratio"])
    assert all(isinstance(v, bool) for v in columns["finer_peak_in_box"])
