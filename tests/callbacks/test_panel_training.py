"""CAMPanel stays out of training's way (bit-identical weights, no hooks, grads, BatchNorm or RNG traces), its
metrics are Lightning metrics, diverged models log NaN, and trained maps find the birds better than a blob."""

from __future__ import annotations

import cubcam.cams  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from panel_runs import LAYER, SIZE, CamMetrics, campanel_warnings, data_for, module_for, picture_threads, trainer_for
from PIL import Image

from cubcam.callbacks import CAMPanel
from cubcam.callbacks.epoch_maps import METRIC_KEYS
from cubcam.cams import GradCAM, localization
from cubcam.cams.protocol import head_cams
from cubcam.cams.targets import ClassLogits
from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.data.synthetic import make_synthetic_cub
from cubcam.train.inspection.checkpoint import load_checkpoint

# These tests validate on the test split on purpose (val_fraction=0: every image of a tiny CUB counts).
pytestmark = pytest.mark.filterwarnings("ignore:val_fraction is 0:cubcam.CubcamWarning")


class DrawsRandomNumbers(pl.Callback):
    """A careless callback: draws from the global RNG at every validation epoch end."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.rand(1)


@pytest.mark.parametrize("kind, proxy", [("classifier", "normalized_mean"), ("embedding", "single_point_nearest")])
def test_weights_are_bit_identical_with_and_without_the_callback(synthetic_cub, tmp_path, kind, proxy):
    def train(callbacks: list[pl.Callback]) -> dict[str, torch.Tensor]:
        pl.seed_everything(0, verbose=False)
        data = data_for(synthetic_cub, kind)
        module = module_for(kind, data)
        trainer_for(tmp_path, 2, callbacks).fit(module, datamodule=data)
        return module.state_dict()

    plain = train([])
    with_panel = train([CAMPanel(num_images=4, proxy=proxy)])
    assert plain.keys() == with_panel.keys()
    different = [k for k in plain if not torch.equal(plain[k], with_panel[k])]
    assert different == []
    if kind == "classifier":  # the comparison can fail: one random number drawn at the wrong time changes training
        careless = train([DrawsRandomNumbers()])
        assert any(not torch.equal(plain[k], careless[k]) for k in plain)


def test_validation_leaves_no_hooks_grads_bn_changes_or_rng_traces(synthetic_cub, tmp_path):
    data = data_for(synthetic_cub, "classifier")
    module = module_for("classifier", data)
    module.train()

    def validate(callbacks: list[pl.Callback]) -> tuple[dict, torch.Tensor]:
        torch.manual_seed(0)
        trainer_for(tmp_path, 1, callbacks).validate(module, datamodule=data, verbose=False)
        return {k: v.clone() for k, v in module.state_dict().items()}, torch.get_rng_state()

    state, rng = validate([])
    panel = CAMPanel(num_images=4)
    state_with, rng_with = validate([panel])
    assert panel.panel is not None and (tmp_path / "cam_panels" / "epoch_000.png").is_file()
    assert all(torch.equal(state[k], state_with[k]) for k in state)  # BatchNorm statistics included
    assert torch.equal(rng, rng_with)
    assert all(p.grad is None for p in module.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in module.modules())
    assert all(m.training for m in module.modules())  # Lightning restores train mode; so did the callback


def test_panel_from_the_validation_outputs_matches_a_fresh_forward(synthetic_cub, tmp_path):
    """The epoch that chooses the panel reads and runs the birds itself; later epochs reuse the loop's feature maps."""
    data = data_for(synthetic_cub, "classifier")
    module = module_for("classifier", data)
    panel = CAMPanel(num_images=4)
    png = tmp_path / "cam_panels" / "epoch_000.png"
    grids = []
    for _ in range(2):  # same weights, same epoch number: the same picture
        trainer_for(tmp_path, 1, [panel]).validate(module, datamodule=data, verbose=False)
        grids.append(np.asarray(Image.open(png).convert("RGB")).astype(int))
    assert grids[0].shape == grids[1].shape
    assert (np.abs(grids[0] - grids[1]) <= 2).mean() > 0.999  # batch-size rounding may move a few overlay values


def centred_blob_score(size: int, boxes: torch.Tensor) -> float:
    """MaxBoxAccV2 of a centred Gaussian on every image (its threshold sweep tries every centred box size)."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = (size - 1) / 2
    blob = torch.exp(-((xs - centre) ** 2 + (ys - centre) ** 2) / (2 * (size / 4) ** 2))
    return float(localization.max_box_acc(blob.expand(len(boxes), -1, -1), boxes)["max_box_acc"])


def test_a_trained_classifier_s_maps_find_the_birds_better_than_a_centred_blob(trained, tmp_path):
    """The session's trained classifier (tests/trained_checkpoints.py) validated with CAMPanel: its MaxBoxAccV2
    beats a centred Gaussian's on the same images."""
    checkpoint = load_checkpoint(trained.classifier)
    size = checkpoint.image_size
    data = CUBDataModule(root=str(trained.root), image_size=size, batch_size=8, num_workers=0, val_fraction=0.0)
    trainer = trainer_for(tmp_path, 1, [CAMPanel(num_images=4)])
    trainer.validate(checkpoint.module, datamodule=data, verbose=False)
    assert trainer.callback_metrics["val/acc"] > 0.6  # it learned the birds (chance: 0.25)
    boxes = torch.stack([data.val_dataset[i]["box"] for i in range(len(data.val_dataset))])
    cam_score, baseline = float(trainer.callback_metrics["val/cam_max_box_acc"]), centred_blob_score(size, boxes)
    assert cam_score > baseline + 0.1, (cam_score, baseline)


@pytest.mark.slow
def test_a_trained_embedding_net_s_maps_find_the_birds_better_than_a_centred_blob(tmp_path):
    """8 epochs of a triplet net from scratch (the lower lr) on 64 images at 96 px (6x6 maps), validated once: its
    MaxBoxAccV2 beats a centred Gaussian's. This pins down what EmbeddingCAM scores: the raw embedding y . p.
    Scoring the L2-normalised embedding (a cosine, saturated near 1 for confident images) gives maps no better
    than the blob (CAM +0.125 over the blob; the cosine +0.01)."""
    size, epochs = 96, 8
    root = make_synthetic_cub(tmp_path / "cub", classes=4, per_class=16, size=128, seed=0).parent
    data = CUBDataModule(
        root=str(root), image_size=size, batch_size=8, num_workers=0, val_fraction=0.0, sampler="m_per_class",
        m_per_class=4,
    )  # fmt: skip
    pl.seed_everything(0, verbose=False)
    trainer = trainer_for(tmp_path, epochs, [CAMPanel(num_images=4)], check_val_every_n_epoch=epochs)
    trainer.fit(module_for("embedding", data, lr=5e-4), datamodule=data)
    assert trainer.callback_metrics["val/precision_at_1"] > 0.6  # it learned the birds
    boxes = torch.stack([data.val_dataset[i]["box"] for i in range(len(data.val_dataset))])
    cam_score, baseline = float(trainer.callback_metrics["val/cam_max_box_acc"]), centred_blob_score(size, boxes)
    assert cam_score > baseline + 0.06, (cam_score, baseline)


class Diverge(pl.Callback):
    """Test probe: from epoch ``start`` on, the module's CAM layer (its backbone's output) is all NaN."""

    def __init__(self, start: int):
        self.start, self.handle = start, None

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        def hook(layer, inputs, output):
            return output * float("nan") if trainer.current_epoch >= self.start else output

        self.handle = module.net.backbone.register_forward_hook(hook)

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.handle.remove()


def test_a_diverged_classifier_logs_nan_cam_metrics_with_one_warning(synthetic_cub, tmp_path):
    """NaN maps were min-max normalised to zeros and scored as misses (0.0); now NaN, and one warning per run."""
    data = data_for(synthetic_cub, "classifier")
    logged = CamMetrics()
    trainer = trainer_for(tmp_path, 3, [CAMPanel(num_images=4), Diverge(start=1), logged], limit_train_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module_for("classifier", data), datamodule=data)
    assert all(np.isfinite(value) for value in logged.epochs[0].values())
    for key in METRIC_KEYS:
        assert np.isnan(logged.epochs[1][key]) and np.isnan(logged.epochs[2][key]), key
    told = [m for m in campanel_warnings(caught) if "training diverged" in m]
    assert len(told) == 1 and told[0].startswith("CAMPanel: training diverged at epoch 1: the CAM maps of 16 of 16")
    assert (tmp_path / "cam_panels" / "epoch_002.png").is_file(), campanel_warnings(caught)  # drawn, without heat


def test_a_diverged_embedding_net_logs_nan_and_stops_cleanly(synthetic_cub, tmp_path):
    """pytorch-metric-learning died on NaN embeddings ("the first len(query) elements of reference must be equal to
    query"); now the retrieval metrics are NaN, one warning says so, and training stops after that epoch."""
    data = data_for(synthetic_cub, "embedding")
    trainer = trainer_for(tmp_path, 4, [Diverge(start=1)], limit_train_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module_for("embedding", data), datamodule=data)
    assert trainer.current_epoch == 2  # epochs 0 and 1 ran; 2 and 3 did not
    assert torch.isnan(trainer.callback_metrics["val/precision_at_1"])
    told = [str(w.message) for w in caught if "training diverged" in str(w.message)]
    assert told == [
        "training diverged at epoch 1: 16 of 16 val embeddings are not finite; the val retrieval "
        "metrics are NaN; training stops"
    ]


@pytest.mark.parametrize(("kind", "layer"), [("classifier", None), ("embedding", None), ("classifier", LAYER)])
def test_cam_metrics_are_lightning_metrics_every_epoch(synthetic_cub, tmp_path, kind, layer):
    """The CAM metrics are in trainer.callback_metrics after each validation epoch, with the values of the maps
    the engine makes of the final weights (the last epoch), and a ModelCheckpoint can monitor them."""
    data = data_for(synthetic_cub, kind)
    pl.seed_everything(0, verbose=False)
    forced = "embedding" if kind == "embedding" and layer else "auto"
    logged = CamMetrics()
    best = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "best", monitor="val/cam_max_box_acc", mode="max")
    panel = CAMPanel(num_images=4, target_layer=layer, kind=forced)
    trainer = trainer_for(tmp_path, 2, [panel, logged, best], limit_train_batches=2, enable_checkpointing=True)
    module = module_for(kind, data)
    trainer.fit(module, datamodule=data)
    assert sorted(logged.epochs) == [0, 1] and all(set(row) == set(METRIC_KEYS) for row in logged.epochs.values())
    assert float(best.best_model_score) == max(row["val/cam_max_box_acc"] for row in logged.epochs.values())
    assert picture_threads() == []
    assert sorted(p.name for p in (tmp_path / "cam_panels").glob("epoch_*")) == ["epoch_000.png", "epoch_001.png"]
    if kind == "classifier":  # the same number from the engine's maps of the final weights, over every image
        data.setup("validate")
        items = [data.val_dataset[i] for i in range(len(data.val_dataset))]
        images, labels = torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])
        module.eval()
        if layer is None:
            with torch.no_grad():
                maps = head_cams(module, module.net.forward_features(images), (SIZE, SIZE), ClassLogits(), labels)
        else:
            maps = GradCAM(module, LAYER)(images, labels)
        expected = localization.max_box_acc(maps, torch.stack([it["box"] for it in items]))["max_box_acc"]
        assert logged.epochs[1]["val/cam_max_box_acc"] == pytest.approx(expected, abs=1e-6)
