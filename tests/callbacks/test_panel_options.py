"""CAMPanel's options and state: the panel's choice, bad arguments named, the method and kind reaching the
maps, state keys, corrupt state, monitors of CAM metrics, boxes that cannot be scored."""

from __future__ import annotations

import cubcam.cams  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import re

import pytest
import pytorch_lightning as pl
import torch
from panel_runs import SIZE, data_for, module_for, trainer_for

from cubcam.callbacks import CAMPanel, CAMPanelWarning
from cubcam.callbacks.epoch_maps import METRIC_KEYS
from cubcam.callbacks.panel_select import random_subset, spread_over_classes
from cubcam.cams.protocol import head_cams
from cubcam.cams.targets import ClassLogits

# These tests validate on the test split on purpose (val_fraction=0: every image of a tiny CUB counts).
pytestmark = pytest.mark.filterwarnings("ignore:val_fraction is 0:cubcam.CubcamWarning")


def test_panel_spreads_over_classes_deterministically_without_the_global_rng():
    labels = [0] * 10 + [1] * 3 + [2] * 1 + [3] * 2
    state = torch.get_rng_state()
    chosen = spread_over_classes(labels, 6, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert len(set(chosen)) == 6 and {labels[i] for i in chosen} == {0, 1, 2, 3}
    assert chosen == spread_over_classes(labels, 6, torch.Generator().manual_seed(0))
    assert len({labels[i] for i in chosen[:4]}) == 4  # round robin: one image of every class before a second one
    others = {tuple(spread_over_classes(labels, 6, torch.Generator().manual_seed(s))) for s in range(1, 6)}
    assert len(others - {tuple(chosen)}) >= 1  # the seed matters
    assert len(spread_over_classes(labels, 100, torch.Generator())) == len(labels)
    subset = random_subset(10, 4, torch.Generator().manual_seed(0))
    assert subset == sorted(set(subset)) and len(subset) == 4 and max(subset) < 10
    assert random_subset(5, 512, torch.Generator()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_images": 0}, "num_images"),
        ({"every_n_epochs": 1.5}, "every_n_epochs"),
        ({"method": "lime"}, "CAM method must be one of"),
        ({"kind": "gradcam"}, "kind"),
        ({"proxy": "mean"}, "proxy"),
        ({"target": "both"}, "target"),
        ({"alpha": 2}, "alpha"),
        ({"colormap": "viridis"}, "colormap"),
        ({"metrics_subset": 0}, "metrics_subset"),
        ({"method": "embeddingcam"}, "a model kind, not a CAM method"),
        ({"method": "scorecam"}, "'scorecam' needs a forward of the whole model per channel and image"),
        ({"method": "ablationcam", "target_layer": "net.layer4"}, "'ablationcam' with target_layer needs"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CAMPanel(**kwargs)


def test_the_method_reaches_the_metrics(synthetic_cub, tmp_path):
    """CAMPanel(method=...) scores the maps of that method: val/cam_heatmap_ratio equals the ratio of the
    head-only maps computed here with it, and differs between methods."""
    from cubcam.cams.localization import heatmap_ratio

    data = data_for(synthetic_cub, "classifier")
    module = module_for("classifier", data)
    data.setup("validate")
    items = [data.val_dataset[i] for i in range(len(data.val_dataset))]
    images, labels = torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])
    boxes = torch.stack([it["box"] for it in items])
    logged = {}
    # (HiResCAM equals GradCAM under a pooled linear head); the gradient-free ones the loop can afford
    for method in ("gradcam", "layercam", "ablationcam", "eigencam"):
        trainer = trainer_for(tmp_path, 1, [CAMPanel(num_images=2, method=method)])
        trainer.validate(module, datamodule=data, verbose=False)
        logged[method] = {key: float(trainer.callback_metrics[key]) for key in METRIC_KEYS}
        module.eval()
        with torch.no_grad():
            activations = module.net.forward_features(images)
        maps = head_cams(module, activations, (SIZE, SIZE), ClassLogits(), labels, method)
        expected = float(heatmap_ratio(maps, boxes).mean())
        assert logged[method]["val/cam_heatmap_ratio"] == pytest.approx(expected, abs=1e-4), method
    ratios = [logged[w]["val/cam_heatmap_ratio"] for w in logged]
    assert all(ratios[i] != pytest.approx(ratios[j]) for i in range(4) for j in range(i + 1, 4)), logged


def test_kind_must_fit_the_model(synthetic_cub, tmp_path):
    data = data_for(synthetic_cub, "classifier")
    trainer = trainer_for(tmp_path, 1, [CAMPanel(kind="embedding")])
    with pytest.raises(ValueError, match="kind='embedding' does not fit a module with cam_kind='classifier'"):
        trainer.validate(module_for("classifier", data), datamodule=data, verbose=False)


def test_state_keys_tell_every_panel_apart() -> None:
    """Two panels that differ in any option that changes what they show keep their own state; the seed does not
    count (a resumed run with another seed shows the birds it showed)."""
    base = CAMPanel()
    variants = [
        CAMPanel(method="gradcam++"),
        CAMPanel(target_layer="net.backbone.layer4"),
        CAMPanel(target="predicted"),
        CAMPanel(proxy="single_point_random"),
        CAMPanel(num_images=4),
    ]
    assert len({base.state_key, *(v.state_key for v in variants)}) == 1 + len(variants)
    assert CAMPanel(seed=5).state_key == base.state_key
    assert set(base.state_dict()) == {"panel", "subset", "evolution"}


def frame(epoch: int, indices: list[int], size: int = 8):
    """An evolution frame of ``indices`` birds: grey pixels, a map peaked in the middle, a box around it."""
    from cubcam.callbacks.evolution import Frame

    n = len(indices)
    maps = torch.zeros(n, 4, 4)
    maps[:, 1:3, 1:3] = 1.0
    boxes = torch.tensor([[2.0, 2, 4, 4]]).repeat(n, 1)
    return Frame(epoch, indices, torch.full((n, size, size, 3), 128, dtype=torch.uint8), maps, boxes, 0.5)


def evolution_state(epochs: list[int], indices: list[int]) -> dict:
    from cubcam.callbacks.evolution import Evolution

    evolution = Evolution()
    for epoch in epochs:
        evolution.add(frame(epoch, indices))
    return evolution.state_dict()


GOOD = evolution_state([1, 3], [1, 2, 3])


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        ({"panel": [3, 1]}, "expected panel, subset and evolution"),
        ({"panel": [3, -1], "subset": None, "evolution": GOOD}, "panel must be None or a list of dataset indices"),
        ({"panel": "3", "subset": None, "evolution": GOOD}, "panel must be None"),
        ({"panel": None, "subset": None, "evolution": {**GOOD, "epochs": [1]}}, "pixels must be [1, 3, -1, -1, 3]"),
        ({"panel": None, "subset": None, "evolution": {**GOOD, "pixels": [[1]]}}, "pixels must be a uint8 tensor"),
        ({"panel": None, "subset": None, "evolution": {**GOOD, "maps": GOOD["pixels"]}}, "maps must be a float"),
        ({"panel": None, "subset": None, "evolution": {**GOOD, "epochs": [1, 1]}}, "an epoch twice"),
        ({"panel": None, "subset": None, "evolution": [1, 2]}, "must have indices, epochs, pixels"),
    ],
)
def test_a_corrupt_or_foreign_state_is_one_warning_and_a_fresh_choice(state, problem) -> None:
    panel = CAMPanel()
    with pytest.warns(CAMPanelWarning, match="not one this CAMPanel wrote") as caught:
        panel.load_state_dict(state)
    assert len(caught) == 1 and problem in str(caught[0].message), str(caught[0].message)
    assert panel.panel is None and panel.subset is None and len(panel.evolution) == 0
    good = {"panel": [1, 2, 3], "subset": [0, 4], "evolution": GOOD}
    panel.load_state_dict(good)  # a state it wrote loads without a word
    assert panel.panel == [1, 2, 3] and panel.subset == [0, 4] and panel.evolution.epochs == [1, 3]
    assert panel.state_dict()["evolution"]["pixels"].equal(GOOD["pixels"])
    with pytest.warns(CAMPanelWarning, match="saved with other options"):  # state under another panel's key
        panel.on_load_checkpoint(None, None, {"callbacks": {CAMPanel(num_images=4).state_key: good}})  # type: ignore[arg-type]


def test_boxes_that_cannot_be_scored_are_left_out_by_dataset_index():
    from cubcam.callbacks.collect import EpochCollector

    collector = EpochCollector(panel=None, subset=[0, 1, 2, 3])
    images = torch.zeros(4, 3, 32, 32)
    step = {
        "index": torch.arange(4),
        "label": torch.zeros(4, dtype=torch.long),
        "output": torch.zeros(4, 2),
        "activations": torch.zeros(4, 8, 2, 2),
    }
    boxes = torch.tensor([[1.0, 1, 10, 10], [float("nan"), 1, 10, 10], [4, 4, -3, 5], [20, 20, 30, 30]])
    collector.add(step, images, boxes)
    assert collector.invalid_boxes == [1, 2]
    columns = collector.take_subset_columns()
    assert columns["index"].tolist() == [0, 3] and collector.subset_rows == []  # taken: held once
    assert columns["box"].tolist() == [[1, 1, 10, 10], [20, 20, 12, 12]]  # the last one clipped to the 32 px image


@pytest.mark.parametrize(
    ("options", "checkpoint", "message"),
    [
        ({"every_n_epochs": 2}, {}, r"CAMPanel\(every_n_epochs=2\) logs it every 2 epochs"),
        ({"log_metrics": False}, {}, r"CAMPanel\(log_metrics=False\) logs it never"),
        ({"every_n_epochs": 2}, {"every_n_epochs": 3}, "every 2 epochs"),
    ],
)
def test_monitoring_a_cam_metric_on_epochs_without_it_is_one_error(
    synthetic_cub, tmp_path, options, checkpoint, message
):
    data = data_for(synthetic_cub, "classifier")
    best = pl.callbacks.ModelCheckpoint(monitor="val/cam_max_box_acc", **checkpoint)
    trainer = trainer_for(tmp_path, 2, [CAMPanel(num_images=4, **options), best], enable_checkpointing=True)
    with pytest.raises(ValueError, match=r"ModelCheckpoint\(monitor='val/cam_max_box_acc'\) needs") as raised:
        trainer.fit(module_for("classifier", data), datamodule=data)
    assert re.search(message, str(raised.value)) and "\n" not in str(raised.value)
    stopping = pl.callbacks.EarlyStopping(monitor="val/cam_max_box_acc", mode="max")
    with pytest.raises(ValueError, match="EarlyStopping"):
        trainer_for(tmp_path, 2, [CAMPanel(num_images=4, every_n_epochs=2), stopping]).fit(
            module_for("classifier", data), datamodule=data
        )
    # A checkpoint that looks only on the epochs CAMPanel measures is fine, and gets the metric.
    matching = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "c", monitor="val/cam_max_box_acc", every_n_epochs=2)
    panel = CAMPanel(num_images=4, every_n_epochs=2)
    trainer_for(tmp_path, 2, [panel, matching], enable_checkpointing=True, limit_train_batches=1).fit(
        module_for("classifier", data), datamodule=data
    )
    assert matching.best_model_score is not None and matching.best_model_path.endswith("epoch=1-step=2.ckpt")


def test_each_evolution_strip_names_its_bird_on_the_strip(monkeypatch):
    """Stacked strips (TensorBoard's val/cam_evolution) had each bird's label under it, read as the next one's."""
    import cubcam.callbacks.evolution as evolution_module

    captions = []
    monkeypatch.setattr(evolution_module, "grid", lambda tiles, labels, **kw: captions.append(labels) or tiles[0])
    evolution = evolution_module.Evolution()
    for epoch in (1, 0):
        evolution.add(frame(epoch, [7, 9]))
    evolution.bird_strips(evolution.tiles("jet", 0.5))
    assert captions == [["#7, epoch 0", "epoch 1"], ["#9, epoch 0", "epoch 1"]]
