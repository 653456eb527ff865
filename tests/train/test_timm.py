"""timm backbones: the engine's ``reshape=`` against pytorch-grad-cam's ``reshape_transform`` on a ViT and a Swin,
cubcam's modules around timm CNNs and ViTs (the CAM layer each kind gets, head-only maps equal to full-net maps),
and the errors a wrong layer or model gives."""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import wandb
from cli_runs import fit_args
from pytorch_grad_cam import GradCAM as PGCGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as PGCGradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from wandb_records import history_rows

from cubcam import CubcamWarning
from cubcam.callbacks.sinks import PANEL_KEY
from cubcam.cams import GradCAM
from cubcam.cams.protocol import features_and_outputs, head_cams
from cubcam.cams.targets import ClassLogits
from cubcam.train.cli import main as cli_main
from cubcam.train.inspection.checkpoint import load_checkpoint
from cubcam.train.inspection.evaluate import main as evaluate_main
from cubcam.train.inspection.explain import main as explain_main
from cubcam.train.models import TokenGrid, nhwc_to_nchw
from cubcam.train.modules import Classifier, EmbeddingNet

TARGETS = [3, 0]


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def vit_reshape(tokens: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """pytorch-grad-cam's documented ViT reshape_transform (class token dropped, tokens onto the grid)."""
    result = tokens[:, 1:, :].reshape(tokens.size(0), grid, grid, tokens.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def swin_reshape(maps: torch.Tensor) -> torch.Tensor:
    return maps.permute(0, 3, 1, 2)


@pytest.mark.parametrize(("ours_class", "pgc_class"), [("gradcam", PGCGradCAM), ("gradcam++", PGCGradCAMPlusPlus)])
def test_vit_maps_equal_pytorch_grad_cam_with_its_reshape_transform(ours_class: str, pgc_class) -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=64).eval()  # 4x4 patches
    images = torch.randn(2, 3, 64, 64)
    layer = model.blocks[-1].norm1  # pytorch-grad-cam's recommended ViT layer
    ours = GradCAM(model, layer, method=ours_class, reshape=TokenGrid(1, (4, 4)))(images, torch.tensor(TARGETS))
    with pgc_class(model=model, target_layers=[layer], reshape_transform=vit_reshape) as cam:
        theirs = cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in TARGETS])
    assert np.abs(ours.numpy() - theirs).max() < 1e-2
    assert corr(ours.numpy(), theirs) > 0.999


def test_swin_maps_equal_pytorch_grad_cam_with_its_reshape_transform() -> None:
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, depths=(1, 1, 1, 1), embed_dim=24
    ).eval()  # a shallow Swin-T layout: the same NHWC stages, few parameters
    images = torch.randn(2, 3, 224, 224)
    layer = model.layers[-1]  # the last stage, NHWC [B, 7, 7, C] in timm 1.x (its blocks see flattened windows)
    ours = GradCAM(model, layer, reshape=nhwc_to_nchw)(images, torch.tensor(TARGETS))
    with PGCGradCAM(model=model, target_layers=[layer], reshape_transform=swin_reshape) as cam:
        theirs = cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in TARGETS])
    assert np.abs(ours.numpy() - theirs).max() < 1e-2
    assert corr(ours.numpy(), theirs) > 0.999


@pytest.mark.parametrize(
    ("arch", "kind", "shape"),
    [
        ("test_resnet", "nchw", (2, 96, 4, 4)),
        ("test_convnext", "nchw", (2, 64, 4, 4)),
        ("test_vit", "vit", (2, 17, 64)),
        ("swin_tiny_patch4_window7_224", "nhwc", (2, 2, 2, 768)),  # NHWC stages: 2x2 at 64 px
    ],
)
@pytest.mark.parametrize("module_class", [Classifier, EmbeddingNet])
def test_timm_modules_explain_from_their_stored_activations(module_class, arch: str, kind: str, shape) -> None:
    """The CAM layer per kind (a CNN's last stage at output stride 16; a ViT's residual stream before its last
    block; Swin's NHWC last stage), and the head-only maps the callback and the tools use equal the maps through the
    whole net."""
    torch.manual_seed(0)
    extra = {"num_classes": 5} if module_class is Classifier else {"embedding_dim": 8}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = module_class(arch=arch, output_stride=16, image_size=64, **extra).eval()
    said = [str(w.message) for w in caught if "output_stride" in str(w.message)]
    assert said == ([f"{arch} does not support output_stride=16; it keeps its own"] if kind != "nchw" else [])
    assert module.net.backbone.kind == kind
    images = torch.randn(2, 3, 64, 64)
    activations, outputs = features_and_outputs(module, images)
    assert tuple(activations.shape) == shape
    with torch.no_grad():
        torch.testing.assert_close(outputs, module(images))
        torch.testing.assert_close(module.forward_head(activations), outputs)
    if module_class is Classifier:
        target, rows = ClassLogits(), torch.tensor(TARGETS)
        head_only = head_cams(module, activations, (64, 64), target, rows)
        full = GradCAM(module, module.cam_target_layer, reshape=module.cam_reshape)(images, rows)
        torch.testing.assert_close(head_only, full, atol=1e-5, rtol=1e-4)
        assert head_only.amax((1, 2)).tolist() == pytest.approx([1.0, 1.0])  # a real map, not a flat one


def test_bad_layers_and_models_give_one_clear_error() -> None:
    model = timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=64).eval()
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(AttributeError, match="nowhere"):
        GradCAM(model, "blocks.nowhere")
    with pytest.raises(TypeError, match=r"target layer blocks.0.norm1 gives \(1, 17, 64\), not a map.*reshape="):
        GradCAM(model, "blocks.0.norm1")(images)
    unused = torch.nn.Linear(2, 2)
    model.add_module("unused", unused)
    with pytest.raises(RuntimeError, match="target layer unused did not run"):
        GradCAM(model, "unused")(images)
    with pytest.raises(ValueError, match="neither a torchvision ResNet .* nor a timm model"):
        Classifier(arch="resnet_imaginary")
    vit = Classifier(arch="test_vit", num_classes=5, image_size=64).eval()
    with pytest.raises(ValueError, match="do not fill the 4x4 grid.*image_size"):
        head_cams(
            vit, features_and_outputs(vit, torch.randn(1, 3, 96, 96))[0], (96, 96), ClassLogits(), torch.tensor([0])
        )


@pytest.mark.slow
@pytest.mark.parametrize("config", ["demo/classifier.yaml", "demo/embedding.yaml"])
@pytest.mark.parametrize("arch", ["test_convnext", "test_vit"])
def test_cubcam_fit_trains_a_timm_model_by_one_override_and_the_tools_read_it(
    config: str, arch: str, tiny_cub: Path, tmp_path: Path, monkeypatch
) -> None:
    """``--model.init_args.arch <timm name>`` on the demo configs (output stride 16 kept where timm supports it,
    a warning where not): a panel and the CAM metrics every epoch, then explain and evaluate on the checkpoint."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(sys, "argv", ["cubcam"])
    monkeypatch.chdir(tmp_path)
    # A ViT has no output stride: the warning says so wherever one is built (training, then each tool's load).
    keeps_its_own = "vit" in arch
    expected = pytest.warns(CubcamWarning, match="does not support output_stride") if keeps_its_own else nullcontext()
    with expected:
        cli_main(
            fit_args(
                [config], tiny_cub, tmp_path, "record", "--trainer.max_epochs", "1", "--model.init_args.arch", arch
            )
        )
        wandb.teardown()
        rows = history_rows(next((tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb")))
        assert sum(PANEL_KEY in row for row in rows) == 1 and any("val/cam_max_box_acc" in row for row in rows)
        last = next((tmp_path / "runs" / "cubcam").glob("*/checkpoints/last.ckpt"))
        loaded = load_checkpoint(last)
        assert loaded.module.hparams.arch == arch and loaded.module.net.backbone.kind == (
            "vit" if "vit" in arch else "nchw"
        )
        report = evaluate_main([str(last), "--limit", "8", "--num-workers", "0", "--out", str(tmp_path / "eval")])
        assert report["num_images"] == 8 and 0 <= report["methods"][next(iter(report["methods"]))]["max_box_acc"] <= 1
        explain_main([str(last), "--num", "4", "--out", str(tmp_path / "explain")])
        summary = json.loads((tmp_path / "explain" / "summary.json").read_text())
        assert len(summary["images"]) == 4 and not summary["errors"]


def test_weights_path_loads_a_local_file_and_pretrained_offline_fails_fast(tmp_path: Path, monkeypatch) -> None:
    import time

    from cubcam.train import models

    torch.manual_seed(1)
    published = timm.create_model("test_convnext", pretrained=False)  # stands in for the downloaded file
    torch.save(published.state_dict(), tmp_path / "test_convnext.pth")
    backbone = models.TimmBackbone(models.BackboneConfig("test_convnext", weights_path=tmp_path / "test_convnext.pth"))
    mine = backbone.model.state_dict()
    shared = [k for k in mine if k in published.state_dict()]
    assert len(shared) > 10 and all(torch.equal(mine[k], published.state_dict()[k]) for k in shared)

    monkeypatch.setattr(models, "HF_HUB_ADDRESS", ("127.0.0.1", 9))  # nothing listens there
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"Hugging Face hub \(127.0.0.1\) is unreachable.*weights_path=<file>"):
        models.TimmBackbone(models.BackboneConfig("test_convnext", pretrained=True))
    assert time.monotonic() - start < 15
    # Weights in the local Hugging Face cache load from there, with the hub unreachable (and no global switch of
    # huggingface_hub's offline mode: its public try_to_load_from_cache finds the file).
    import huggingface_hub

    asked = []

    def cache(repo: str, file_name: str, **kwargs):
        asked.append((repo, file_name))
        return str(tmp_path / "test_convnext.pth") if file_name == "model.safetensors" else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cache)
    offline = models.TimmBackbone(models.BackboneConfig("test_convnext", pretrained=True)).model.state_dict()
    assert asked[0] == (timm.models.get_pretrained_cfg("test_convnext").hf_hub_id, "model.safetensors")
    assert all(torch.equal(offline[k], published.state_dict()[k]) for k in shared)
    with pytest.raises(FileNotFoundError, match="weights_path .*missing.pth does not exist"):
        models.TimmBackbone(models.BackboneConfig("test_convnext", weights_path=tmp_path / "missing.pth"))


def test_a_channels_last_stage_without_reshape_is_refused_by_name() -> None:
    """Swin's [B, 7, 7, 768] read as channels-first is 7 channels of a 7 x 768 "grid": maps that look fine and mean
    nothing. It is one error naming the layer and the fix."""
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, depths=(1, 1, 1, 1), embed_dim=24
    ).eval()
    with pytest.raises(ValueError, match=r"layers\.3 gives \(2, 7, 7, 192\), which looks channels-last"):
        GradCAM(model, "layers.3")(torch.randn(2, 3, 224, 224), torch.tensor(TARGETS))
    assert GradCAM(model, "layers.3", reshape=nhwc_to_nchw)(torch.randn(2, 3, 224, 224)).shape == (2, 224, 224)
