"""Backbones and nets (cubcam.train.models) and the CAM protocol of the LightningModules (cubcam.train.modules),
no training."""

from __future__ import annotations

import dataclasses
import inspect
import socket

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from torch import nn

from cubcam.train import models
from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.models import BackboneConfig, PooledLinearNet, ResNetBackbone
from cubcam.train.modules import Classifier, CUBModule, EmbeddingNet


def torchvision_trunk(resnet: nn.Module) -> nn.Module:
    return nn.Sequential(*list(resnet.children())[:-2])  # minus avgpool and fc


@pytest.mark.parametrize(
    ("arch", "size", "stride", "grid"),
    [
        ("resnet18", 128, 16, 8),
        ("resnet18", 224, 32, 7),
        ("resnet18", 224, 16, 14),
        ("resnet34", 64, 16, 4),
    ],
)
def test_backbone_grid_follows_output_stride(arch: str, size: int, stride: int, grid: int) -> None:
    backbone = ResNetBackbone(BackboneConfig(arch, output_stride=stride))
    maps = backbone(torch.randn(1, 3, size, size))
    assert maps.shape == (1, 512, grid, grid) and backbone.num_features == 512
    assert backbone.cam_layer is backbone.layer4
    assert not any(name.startswith("cam_layer") for name, _ in backbone.named_modules())  # not registered twice


def test_stride16_matches_torchvision_dilation_for_bottlenecks() -> None:
    torch.manual_seed(0)
    ours = ResNetBackbone(BackboneConfig("resnet50", output_stride=16)).eval()
    reference = torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True]).eval()
    reference.load_state_dict(ours.state_dict(), strict=False)  # same names; fc stays random, unused
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), torchvision_trunk(reference)(x))
    assert ours.num_features == 2048


@pytest.mark.parametrize("drop_fc", [False, True])
def test_weights_path_loads_a_torchvision_state_dict(tmp_path, drop_fc: bool) -> None:
    torch.manual_seed(1)
    reference = torchvision.models.resnet18().eval()
    state = {k: v for k, v in reference.state_dict().items() if not (drop_fc and k.startswith("fc."))}
    torch.save(state, tmp_path / "r18.pth")
    backbone = ResNetBackbone(BackboneConfig("resnet18", weights_path=tmp_path / "r18.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), torchvision_trunk(reference)(x))


def test_weights_path_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        ResNetBackbone(BackboneConfig("resnet18", weights_path=tmp_path / "nowhere.pth"))
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match="do not fit torchvision's resnet18"):
        ResNetBackbone(BackboneConfig("resnet18", weights_path=tmp_path / "r34.pth"))
    with pytest.raises(ValueError, match="arch must be one of"):
        ResNetBackbone(BackboneConfig("vgg16"))
    with pytest.raises(ValueError, match="output_stride"):
        ResNetBackbone(BackboneConfig("resnet18", output_stride=8))


def test_pretrained_reads_the_torch_hub_cache(tmp_path, monkeypatch) -> None:
    """pretrained=True takes torchvision's file from $TORCH_HOME/hub/checkpoints when it is there (no network)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(2)
    reference = torchvision.models.resnet18().eval()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / models.IMAGENET_URLS["resnet18"].rsplit("/", 1)[1])
    backbone = ResNetBackbone(BackboneConfig("resnet18", pretrained=True)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), torchvision_trunk(reference)(x))


def test_unreachable_pretrained_download_fails_fast_with_advice(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache
    with socket.socket() as probe:  # a port that was just free: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/resnet18-f37072fd.pth"
    monkeypatch.setitem(models.IMAGENET_URLS, "resnet18", url)
    with pytest.raises(RuntimeError, match="weights_path") as info:
        ResNetBackbone(BackboneConfig("resnet18", pretrained=True))
    assert url in str(info.value)
    assert socket.getdefaulttimeout() is None  # the temporary download timeout was put back


def test_nets_split_features_and_head() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 64)
    classifier = PooledLinearNet(ResNetBackbone(BackboneConfig("resnet18")), out_features=5).eval()
    embedder = PooledLinearNet(ResNetBackbone(BackboneConfig("resnet18")), out_features=16).eval()
    with torch.no_grad():
        maps = classifier.forward_features(x)
        torch.testing.assert_close(classifier.forward_head(maps), classifier.fc(maps.mean((2, 3))))
        torch.testing.assert_close(classifier(x), classifier.forward_head(maps))
        embeddings = embedder(x)
        expected = embedder.fc(embedder.forward_features(x).mean((2, 3)))
    assert embeddings.shape == (2, 16)
    torch.testing.assert_close(embeddings, expected)  # raw: EmbeddingCAM scores y . p on it, the loss normalises


def fake_batch(size: int = 64, n: int = 4) -> dict[str, torch.Tensor]:
    return {
        "image": torch.randn(n, 3, size, size),
        "label": torch.arange(n) % 2,
        "box": torch.zeros(n, 4),
        "parts": torch.zeros(n, 15, 3),
        "image_id": torch.arange(n) + 1,
        "index": torch.arange(n) + 10,
    }


@pytest.mark.parametrize(
    ("module_cls", "kind", "width"), [(Classifier, "classifier", 3), (EmbeddingNet, "embedding", 8)]
)
def test_validation_step_returns_the_target_layer_maps_from_one_pass(module_cls, kind: str, width: int) -> None:
    kwargs = {"num_classes": 3} if module_cls is Classifier else {"num_classes": 3, "embedding_dim": 8}
    module = module_cls(arch="resnet18", output_stride=16, **kwargs).eval()
    module.log = lambda *args, **kw: None  # no trainer attached
    batch = fake_batch()
    captured = []
    handle = module.cam_target_layer.register_forward_hook(lambda m, i, out: captured.append(out))
    try:
        with torch.no_grad():
            out = module.validation_step(batch, 0)
            direct = module(batch["image"])
    finally:
        handle.remove()
    assert len(captured) == 2  # one trunk pass in validation_step, one for `direct`
    assert module.cam_kind == kind and module.cam_target_layer is module.net.backbone.layer4
    torch.testing.assert_close(out["activations"], captured[0])
    assert out["activations"].shape == (4, 512, 4, 4) and not out["activations"].requires_grad
    assert out["output"].shape == (4, width)
    torch.testing.assert_close(out["output"], direct)
    torch.testing.assert_close(module.forward_head(out["activations"]), direct)
    assert torch.equal(out["label"], batch["label"]) and torch.equal(out["index"], batch["index"])
    assert module.class_names == ["class 0", "class 1", "class 2"]


def test_class_names_are_kept_and_checked() -> None:
    assert Classifier(num_classes=2, class_names=["Albatross", "Wren"]).class_names == ["Albatross", "Wren"]
    with pytest.raises(ValueError, match="class_names has 1 names but num_classes is 2"):
        Classifier(num_classes=2, class_names=["Albatross"])


def test_network_arguments_are_one_contract_with_flat_keys() -> None:
    """CUBModule takes exactly BackboneConfig's fields, with its defaults, as flat arguments; the two modules take
    them through **kwargs, so jsonargparse still offers --model.init_args.arch and the hyper-parameters hold them."""
    fields = {f.name: f.default for f in dataclasses.fields(BackboneConfig)}
    parameters = inspect.signature(CUBModule.__init__).parameters
    assert {name: parameters[name].default for name in fields} == fields
    for cls in (Classifier, EmbeddingNet):
        own = inspect.signature(cls.__init__).parameters
        assert not set(fields) & set(own) and any(p.kind == p.VAR_KEYWORD for p in own.values())
    module = Classifier(num_classes=3, arch="resnet18", output_stride=16)
    assert module.backbone_config == BackboneConfig("resnet18", output_stride=16)
    saved = {k: v for k, v in fields.items() if k != "image_size"}
    assert {k: module.hparams[k] for k in saved} == saved | {"output_stride": 16}
    assert "image_size" not in module.hparams  # None is not saved: it would clash with the datamodule's
    assert Classifier(num_classes=3, image_size=64).hparams["image_size"] == 64
    assert module.hparams["num_classes"] == 3
    with pytest.raises(ValueError, match="either pretrained=True or weights_path"):
        BackboneConfig("resnet18", pretrained=True, weights_path="w.pth")


class StopAfter(pl.Callback):
    """Test probe: stops training after ``steps`` optimiser steps, noting the learning rate of each."""

    def __init__(self, steps: int):
        self.steps, self.rates = steps, []

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: object) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[1]["lr"])
        trainer.should_stop = trainer.global_step >= self.steps


@pytest.mark.filterwarnings("ignore:val_fraction is 0:cubcam.CubcamWarning")  # a tiny CUB: validate on its test split
def test_training_without_an_end_keeps_a_constant_learning_rate(synthetic_cub, tmp_path, caplog) -> None:
    """``max_epochs=-1`` (Lightning's "train forever") has no step count for the cosine decay: the rate stays at
    ``lr``, with one line saying so (it was an OverflowError at start-up)."""
    data = CUBDataModule(root=str(synthetic_cub), image_size=64, batch_size=8, num_workers=0, val_fraction=0.0)
    module = Classifier(arch="resnet18", num_classes=data.num_classes, lr=1e-3)
    stop = StopAfter(3)
    trainer = pl.Trainer(
        max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[stop], default_root_dir=tmp_path,
    )  # fmt: skip
    with caplog.at_level("INFO"):
        trainer.fit(module, datamodule=data)
    assert stop.rates == [1e-3] * len(stop.rates) and len(stop.rates) >= 3
    assert "training has no end (max_epochs=-1, no max_steps): the learning rate stays constant" in caplog.text

    caplog.clear()  # max_steps alone is an end: the cosine decays over it
    stop = StopAfter(3)
    trainer = pl.Trainer(
        max_epochs=-1, max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[stop],
        default_root_dir=tmp_path,
    )  # fmt: skip
    with caplog.at_level("INFO"):
        trainer.fit(Classifier(arch="resnet18", num_classes=data.num_classes, lr=1e-3), datamodule=data)
    assert len(set(stop.rates)) == len(stop.rates) >= 3 and "training has no end" not in caplog.text


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # training_step outside a Trainer
def test_batches_without_a_possible_triplet_are_one_warning_naming_the_settings() -> None:
    """One class a batch (``m_per_class`` equal to ``batch_size``) gives a loss of exactly 0 at every step: after
    three such batches in a row one warning names the settings; batches that can hold triplets reset the count."""
    from cubcam import CubcamWarning

    torch.manual_seed(0)
    module = EmbeddingNet(arch="resnet18", num_classes=4, embedding_dim=8)
    one_class = {"image": torch.randn(4, 3, 32, 32), "label": torch.zeros(4, dtype=torch.long)}
    mixed = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 0, 1, 1])}
    module.training_step(one_class, 0)
    module.training_step(one_class, 1)
    module.training_step(mixed, 2)  # the count starts again
    module.training_step(one_class, 3)
    module.training_step(one_class, 4)
    with pytest.warns(CubcamWarning) as caught:
        loss = module.training_step(one_class, 5)
        module.training_step(one_class, 6)  # once a run
    assert float(loss) == 0.0
    messages = [str(w.message) for w in caught if issubclass(w.category, CubcamWarning)]
    assert len(messages) == 1 and "3 training batches in a row can hold no triplet" in messages[0]
    assert "(this one: 4 images of 1 class(es))" in messages[0]
    assert all(name in messages[0] for name in ("data.m_per_class", "data.batch_size", "semihard"))


def test_images_too_small_for_the_layer_are_refused_naming_the_layer() -> None:
    """At 16 px ResNet-18's layer4 (output stride 32) is a 1x1 grid: the error names the layer by its dotted name
    (it said ``NoneType``, the head's) and what to change."""
    from cubcam.cams.protocol import head_cams
    from cubcam.cams.targets import ClassLogits

    module = Classifier(arch="resnet18", num_classes=4).eval()
    with torch.no_grad():
        activations = module.net.forward_features(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"target layer net\.backbone\.layer4 gives a 1x1 grid .*larger images"):
        head_cams(module, activations, (16, 16), ClassLogits(), torch.tensor([0, 1]))
