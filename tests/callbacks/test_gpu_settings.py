"""What GPU training runs with, on the CPU: mixed precision, ``torch.compile``d nets (names with ``_orig_mod.``) and
channels-last weights, through the callback's both paths and the checkpoint tools."""

from __future__ import annotations

import cubcam.cams  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

from cubcam.callbacks import CAMPanel
from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.inspection.checkpoint import load_checkpoint
from cubcam.train.modules import Classifier, EmbeddingNet

# These tests validate on the test split on purpose (val_fraction=0: every image of a tiny CUB counts).
pytestmark = pytest.mark.filterwarnings("ignore:val_fraction is 0:cubcam.CubcamWarning")

LAYER = "net.backbone.layer4"


def data_for(root: Path) -> CUBDataModule:
    return CUBDataModule(root=str(root), image_size=64, batch_size=8, num_workers=0, val_fraction=0.0)


def module_for(kind: str, data: CUBDataModule) -> pl.LightningModule:
    torch.manual_seed(0)
    common = dict(arch="resnet18", output_stride=16, num_classes=data.num_classes, class_names=data.class_names)
    return Classifier(**common) if kind == "classifier" else EmbeddingNet(**common, embedding_dim=32)


def run(folder: Path, module: pl.LightningModule, data: CUBDataModule, panel: CAMPanel, fit: bool, **kwargs):
    """A fit of one batch (or a validation) with ``panel``; returns its CAM metrics and the CAMPanel warnings."""
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        default_root_dir=str(folder),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=1,
        callbacks=[panel],
        **kwargs,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data) if fit else trainer.validate(module, datamodule=data, verbose=False)
    logged = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/cam_")}
    return logged, [str(w.message) for w in caught if "CAMPanel" in str(w.message)]


@pytest.mark.parametrize("kind", ["classifier", "embedding"])
def test_bf16_mixed_maps_are_float32_maps_of_the_same_weights(synthetic_cub, tmp_path, kind):
    """Validated under bf16-mixed, the maps come from bf16 activations but are made in float32 (head, method,
    upsampling): the metrics stay within bf16's rounding of a float32 validation of the same weights."""
    data = data_for(synthetic_cub)
    module = module_for(kind, data)
    full, told = run(tmp_path / "32", module, data, CAMPanel(num_images=2), fit=False)
    mixed, told_mixed = run(tmp_path / "bf16", module, data, CAMPanel(num_images=2), fit=False, precision="bf16-mixed")
    assert told == told_mixed == []
    assert all(np.isfinite(value) for value in mixed.values())
    assert mixed["val/cam_heatmap_ratio"] == pytest.approx(full["val/cam_heatmap_ratio"], abs=5e-3)
    for key, value in full.items():  # a count over 16 images: one image may flip
        assert mixed[key] == pytest.approx(value, abs=1 / 16 + 1e-9), key
    assert (tmp_path / "bf16" / "cam_panels" / "epoch_000.png").is_file()


def test_a_compiled_net_is_explained_on_both_paths_under_both_names(synthetic_cub, tmp_path):
    """``module.net = torch.compile(net)``: the protocol path and target_layer= (``net.backbone.layer4`` and its
    ``net._orig_mod.backbone.layer4`` spelling) give the same metrics and panels, hooks firing in eager forwards;
    its checkpoint, whose names carry ``_orig_mod.``, loads in the tools."""
    data = data_for(synthetic_cub)
    logged = {}
    for layer in (None, LAYER, "net._orig_mod.backbone.layer4"):
        module = module_for("classifier", data)
        module.net = torch.compile(module.net, backend="eager")  # dynamo without code generation: fast on a CPU
        folder = tmp_path / str(layer)
        logged[layer], told = run(folder, module, data, CAMPanel(num_images=2, target_layer=layer), fit=True)
        assert told == [], told
        assert (folder / "cam_panels" / "epoch_000.png").is_file()
    assert logged[None] == pytest.approx(logged[LAYER], abs=1e-6) == logged["net._orig_mod.backbone.layer4"]
    (ckpt,) = (tmp_path / "None").glob("**/*.ckpt")
    assert any("_orig_mod." in key for key in torch.load(ckpt, weights_only=True)["state_dict"])
    loaded = load_checkpoint(ckpt).module
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, saved[key.replace("net.", "net._orig_mod.", 1)]), key


def test_channels_last_weights_give_the_same_metrics(synthetic_cub, tmp_path):
    data = data_for(synthetic_cub)
    module = module_for("classifier", data)
    plain, _ = run(tmp_path / "plain", module, data, CAMPanel(num_images=2), fit=False)
    for layer in (None, LAYER):
        last, told = run(
            tmp_path / f"last-{layer}",
            module.to(memory_format=torch.channels_last),
            data,
            CAMPanel(num_images=2, target_layer=layer),
            fit=False,
        )
        assert told == [] and last == pytest.approx(plain, abs=1e-5), layer


def test_the_gpu_overlay_layers_on_the_real_configs(capsys) -> None:
    from cubcam.train.cli import main

    for config in ("classifier.yaml", "embedding.yaml"):
        with pytest.raises(SystemExit):
            main(["fit", "--config", config, "--config", "trainer/gpu.yaml", "--print_config"])
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["trainer"]["precision"] == "bf16-mixed" and printed["trainer"]["accelerator"] == "gpu"
        assert printed["data"]["num_workers"] == 8 and printed["model"]["init_args"]["arch"] == "resnet50"
