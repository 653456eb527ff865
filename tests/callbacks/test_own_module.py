"""CAMPanel on modules that know nothing of cubcam (``target_layer=``): the README's example as written, tuple
batches without boxes, dict batches with boxes (then the metrics too, equal to cams.localization on the engine's
maps), and the callback's guarantees on this path: bit-identical weights, no hooks or RNG traces, the same panel
after a resume, one clear error for a bad layer."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from panel_runs import trainer_for as trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset
from wandb_records import finished_log, history_rows

from cubcam.callbacks import CAMPanel
from cubcam.callbacks.epoch_maps import METRIC_KEYS
from cubcam.callbacks.sinks import PANEL_KEY
from cubcam.cams import EmbeddingCAM, GradCAM, localization, normalized_mean_proxies
from cubcam.train.data.datamodule import CUBDataModule

# These tests validate on the test split on purpose (val_fraction=0: every image of a tiny CUB counts).
pytestmark = pytest.mark.filterwarnings("ignore:val_fraction is 0:cubcam.CubcamWarning")

REPO = Path(__file__).resolve().parents[2]
SIZE = 64
LAYER = "model.stages.3"  # timm ConvNeXt's last stage


def load_example():
    spec = importlib.util.spec_from_file_location("own_module", REPO / "examples" / "own_module.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["own_module"] = module
    spec.loader.exec_module(module)
    return module


example = load_example()


class Mapped(Dataset):
    """A CUB split whose items pass through ``convert``, as another kind of dataset would give them."""

    def __init__(self, dataset, convert):
        self.dataset, self.convert = dataset, convert

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.convert(self.dataset[i])


def as_tuple(item: dict) -> tuple:
    """``(image, label)``, as an ImageFolder gives them (no boxes)."""
    return item["image"], item["label"]


def as_binary(item: dict) -> dict:
    """The item with a binary label (even / odd class), its box kept."""
    return {**item, "label": item["label"] % 2}


def cub_data(root: Path) -> CUBDataModule:
    data = CUBDataModule(root=str(root), image_size=SIZE, batch_size=8, num_workers=0, val_fraction=0.0)
    data.setup(None)
    return data


def plain_module(num_classes: int) -> pl.LightningModule:
    pl.seed_everything(0, verbose=False)
    return example.LitClassifier("test_convnext", num_classes=num_classes)


def tuple_loaders(data: CUBDataModule) -> tuple[DataLoader, DataLoader]:
    return (
        DataLoader(Mapped(data.train_dataset, as_tuple), batch_size=8, shuffle=True, drop_last=True),
        DataLoader(Mapped(data.val_dataset, as_tuple), batch_size=8),
    )


def test_the_readme_example_runs_as_written_and_logs_a_panel_every_epoch(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    done = example.main(["--data", str(tmp_path / "cub"), "--epochs", "2", "--out", str(tmp_path / "runs")])
    run_dir = Path(done.logger.experiment.dir).parent
    done.logger.experiment.finish()
    rows = history_rows(finished_log(run_dir))
    panels = [row for row in rows if PANEL_KEY in row]
    captions = [row[PANEL_KEY]["caption"] for row in panels]
    assert [len(re.findall(r"#\d+", caption)) for caption in captions] == [8, 8]  # a panel of 8 birds per epoch
    assert captions[1].startswith("epoch 1: ")
    assert not any(key in row for row in rows for key in METRIC_KEYS)  # no boxes: no metrics, and no error
    table = json.loads(next(iter(sorted(run_dir.glob("files/media/table/val/cam_table_*.table.json")))).read_text())
    columns = table["columns"]
    # The ImageFolder's class names (its classes), not "class 0".
    folders = {p.name for p in (tmp_path / "cub" / "CUB_200_2011" / "images").iterdir()}
    named = [row[columns.index("true")] for row in table["data"]]
    assert set(named) <= folders and len(set(named)) > 1, named
    for name in ("cam_box_iou", "heatmap_ratio", "peak_in_box"):  # no box: empty cells, not 0.0 or False
        assert {row[columns.index(name)] for row in table["data"]} == {None}, name
    assert sorted(p.name for p in run_dir.parent.parent.glob("cubcam-own/*/cam_panels/epoch_*.png")) == [
        "epoch_000.png",
        "epoch_001.png",
    ]


def test_boxed_dict_batches_also_give_the_metrics_of_the_engine_s_maps(synthetic_cub, tmp_path) -> None:
    data = cub_data(synthetic_cub)
    module = plain_module(data.num_classes)
    validated = trainer(tmp_path, 1, [CAMPanel(target_layer=LAYER, num_images=4)])
    validated.validate(module, datamodule=data, verbose=False)
    logged = {key: float(validated.callback_metrics[key]) for key in METRIC_KEYS}
    assert (tmp_path / "cam_panels" / "epoch_000.png").is_file()
    items = [data.val_dataset[i] for i in range(len(data.val_dataset))]  # all: fewer than the 512 of the subset
    images = torch.stack([item["image"] for item in items])
    labels = torch.tensor([item["label"] for item in items])
    boxes = torch.stack([item["box"] for item in items])
    cam = GradCAM(module, LAYER)
    maps = torch.cat([cam(images[i : i + 8], labels[i : i + 8]) for i in range(0, len(images), 8)])
    expected = localization.max_box_acc(maps, boxes)
    assert logged["val/cam_max_box_acc"] == pytest.approx(expected["max_box_acc"], abs=1e-6)
    assert logged["val/cam_box_acc_iou50"] == pytest.approx(expected["box_acc_iou50"], abs=1e-6)
    ratio = float(localization.heatmap_ratio(maps, boxes).mean())
    assert logged["val/cam_heatmap_ratio"] == pytest.approx(ratio, abs=1e-6)


def test_embeddingcam_on_a_plain_module_uses_the_loop_s_outputs(synthetic_cub, tmp_path) -> None:
    """kind="embedding": ``module(images)`` are embeddings; the proxies come from the outputs the
    validation loop's own ``self(images)`` produced (kept by a forward hook), so no extra forward per batch."""
    data = cub_data(synthetic_cub)
    module = plain_module(16)  # 16-d "embeddings"
    calls = []
    module.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    panel = CAMPanel(target_layer=LAYER, num_images=4, kind="embedding", log_metrics=False)
    trainer(tmp_path, 1, [panel]).validate(module, datamodule=data, verbose=False)
    batches = [n for n in calls if n == 8]  # the validation batches (16 images); the callback's own calls: <= 4
    assert sum(batches) == len(data.val_dataset) == 16  # one forward per batch: the loop's, none of ours
    assert sorted(set(calls) - {8}) == [1, 4]  # the layer check's one image; the 4 panel birds
    assert (tmp_path / "cam_panels" / "epoch_000.png").is_file() and panel.panel is not None
    assert all(not m._forward_hooks for m in module.modules() if m is not module)
    assert len(module._forward_hooks) == 0 and len(module._forward_pre_hooks) == 1  # ours is gone, the test's stays


class CallsItsModel(example.LitClassifier):
    """A validation_step that calls ``self.model(images)``, not ``self(images)``: the callback sees no output of the
    loop's and runs one forward of its own per batch."""

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = self.unpack(batch)
        self.log("val/loss", F.cross_entropy(self.model(images), labels))


@pytest.mark.parametrize("module_class", [example.LitClassifier, CallsItsModel])
def test_embeddingcam_metrics_equal_the_engine_s_with_the_true_proxies(synthetic_cub, tmp_path, module_class) -> None:
    """Each batch's outputs are its own, however validation_step runs the model: the epoch's Normalized Mean
    Proxies, and with them the metrics, equal those of the engine on embeddings computed here. (The callback's own
    forward once leaked into the next batch, which then took the previous batch's embeddings.)"""
    data = cub_data(synthetic_cub)
    pl.seed_everything(0, verbose=False)
    module = module_class("test_convnext", num_classes=16)  # 16-d "embeddings"
    validated = trainer(tmp_path, 1, [CAMPanel(target_layer=LAYER, num_images=4, kind="embedding")])
    validated.validate(module, datamodule=data, verbose=False)
    logged = {key: float(validated.callback_metrics[key]) for key in METRIC_KEYS}
    items = [data.val_dataset[i] for i in range(len(data.val_dataset))]
    images = torch.stack([item["image"] for item in items])
    labels = torch.tensor([item["label"] for item in items])
    boxes = torch.stack([item["box"] for item in items])
    module.eval()
    with torch.no_grad():
        embeddings = torch.cat([module(images[i : i + 8]) for i in range(0, len(images), 8)])
    proxies = normalized_mean_proxies(embeddings, labels, num_classes=data.num_classes)
    cam = EmbeddingCAM(module, LAYER)
    maps = torch.cat([cam(images[i : i + 8], proxies[labels[i : i + 8]]) for i in range(0, len(images), 8)])
    expected = localization.max_box_acc(maps, boxes)
    assert logged["val/cam_max_box_acc"] == pytest.approx(expected["max_box_acc"], abs=1e-6)
    assert logged["val/cam_heatmap_ratio"] == pytest.approx(
        float(localization.heatmap_ratio(maps, boxes).mean()), abs=1e-6
    )


def test_weights_are_bit_identical_and_nothing_is_left_behind(synthetic_cub, tmp_path) -> None:
    data = cub_data(synthetic_cub)

    def train(callbacks: list[pl.Callback]) -> tuple[dict[str, torch.Tensor], torch.Tensor, pl.LightningModule]:
        module = plain_module(data.num_classes)
        train_loader, val_loader = tuple_loaders(data)
        trainer(tmp_path, 2, callbacks).fit(module, train_loader, val_loader)
        return module.state_dict(), torch.get_rng_state(), module

    plain, rng, _ = train([])
    with_panel, rng_with, module = train([CAMPanel(target_layer=LAYER, num_images=4)])
    assert [k for k in plain if not torch.equal(plain[k], with_panel[k])] == []
    assert torch.equal(rng, rng_with)
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in module.modules())
    assert sorted(p.name for p in (tmp_path / "cam_panels").glob("epoch_*.png")) == ["epoch_000.png", "epoch_001.png"]


def test_a_resumed_run_shows_the_same_birds(synthetic_cub, tmp_path) -> None:
    data = cub_data(synthetic_cub)
    train_loader, val_loader = tuple_loaders(data)
    first = CAMPanel(target_layer=LAYER, num_images=4, seed=3)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, 1, [first, checkpoint], enable_checkpointing=True).fit(
        plain_module(data.num_classes), train_loader, val_loader
    )
    resumed = CAMPanel(target_layer=LAYER, num_images=4, seed=99)  # another seed: the saved panel still wins
    trainer(
        tmp_path, 2, [resumed, pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt")], enable_checkpointing=True
    ).fit(plain_module(data.num_classes), train_loader, val_loader, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert first.panel is not None and resumed.panel == first.panel


@pytest.mark.parametrize(
    ("layer", "error", "message"),
    [
        ("model.nowhere", AttributeError, "target_layer 'model.nowhere'"),
        ("model.head.fc", TypeError, r"target layer model.head.fc gives \(1, 4\), not a map"),
    ],
)
def test_a_bad_layer_is_one_clear_error(synthetic_cub, tmp_path, layer: str, error: type, message: str) -> None:
    data = cub_data(synthetic_cub)
    with pytest.raises(error, match=message):
        trainer(tmp_path, 1, [CAMPanel(target_layer=layer, num_images=4)]).validate(
            plain_module(data.num_classes), datamodule=data, verbose=False
        )


def test_a_module_without_the_protocol_and_without_a_layer_is_told_what_to_pass(synthetic_cub, tmp_path) -> None:
    data = cub_data(synthetic_cub)
    with pytest.raises(TypeError, match="CAMPanel needs target_layer='<dotted layer name>'"):
        trainer(tmp_path, 1, [CAMPanel()]).validate(plain_module(data.num_classes), datamodule=data, verbose=False)


def test_validation_leaves_no_grads_batchnorm_changes_or_rng_traces(synthetic_cub, tmp_path) -> None:
    """The target_layer path's own forwards and backwards, on a module with BatchNorm (timm's test_resnet)."""
    data = cub_data(synthetic_cub)
    pl.seed_everything(0, verbose=False)
    module = example.LitClassifier("test_resnet", num_classes=data.num_classes)
    module.train()

    def validate(callbacks: list[pl.Callback]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        torch.manual_seed(0)
        trainer(tmp_path, 1, callbacks).validate(module, datamodule=data, verbose=False)
        return {k: v.clone() for k, v in module.state_dict().items()}, torch.get_rng_state()

    state, rng = validate([])
    state_with, rng_with = validate([CAMPanel(target_layer="model.layer4", num_images=4)])
    assert (tmp_path / "cam_panels" / "epoch_000.png").is_file()
    assert any("running_mean" in k for k in state) and all(torch.equal(state[k], state_with[k]) for k in state)
    assert torch.equal(rng, rng_with)
    assert all(p.grad is None for p in module.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in module.modules())
    assert all(m.training for m in module.modules())


class TransferLearning(pl.LightningModule):
    """Lightning's transfer-learning example's shape (domain_templates/computer_vision_fine_tuning.py): a ResNet
    feature extractor frozen by ``BaseFinetuning``, a one-logit head, BCE."""

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet18

        backbone = resnet18()
        self.feature_extractor = nn.Sequential(*list(backbone.children())[:-2])
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1))

    def forward(self, images):
        return self.fc(self.feature_extractor(images))

    def training_step(self, batch, batch_idx):
        return F.binary_cross_entropy_with_logits(self(batch["image"])[:, 0], batch["label"].float())

    def validation_step(self, batch, batch_idx):
        self(batch["image"])

    def configure_optimizers(self):
        return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=1e-3)


def test_a_binary_head_with_a_frozen_backbone_gets_panels_and_metrics(synthetic_cub, tmp_path) -> None:
    """It trained, but every epoch warned "targets must lie in [0, 1), got range [0, 1]" and drew no panel."""
    from pytorch_lightning.callbacks import BaseFinetuning

    class Freeze(BaseFinetuning):
        def freeze_before_training(self, module):
            self.freeze(module.feature_extractor)

        def finetune_function(self, module, epoch, optimizer):
            pass

    data = cub_data(synthetic_cub)
    train = DataLoader(Mapped(data.train_dataset, as_binary), batch_size=8, shuffle=True, drop_last=True)
    val = DataLoader(Mapped(data.val_dataset, as_binary), batch_size=8)
    torch.manual_seed(0)
    panel = CAMPanel(num_images=4, target_layer="feature_extractor.7")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = trainer(tmp_path, 1, [panel, Freeze()], limit_train_batches=2)
        done.fit(TransferLearning(), train, val)
    assert not [str(w.message) for w in caught if "CAMPanel" in str(w.message)]
    assert set(METRIC_KEYS) <= set(done.callback_metrics)
    assert (tmp_path / "cam_panels" / "epoch_000.png").is_file()


def test_an_output_the_callback_cannot_explain_is_one_error_naming_its_shape_and_the_options(
    synthetic_cub, tmp_path
) -> None:
    """A head of [B, C, 2] (two scores a class): not a warning every epoch, one error at the first batch."""

    class TwoScores(TransferLearning):
        def forward(self, images):
            return super().forward(images).repeat(1, 6).view(-1, 3, 2)

    data = cub_data(synthetic_cub)
    with pytest.raises(TypeError, match=r"gives \(1, 3, 2\).*\[B, C\] logits .*score=\) or \[B, D\] embeddings"):
        trainer(tmp_path, 1, [CAMPanel(target_layer="feature_extractor.7", num_images=4)]).validate(
            TwoScores(), datamodule=data, verbose=False
        )
