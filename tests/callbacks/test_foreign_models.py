"""CAMPanel on models and data no one here wrote (issue 33), rebuilt from synthetic data: grayscale 28 px digits
(an MNIST module's shape), a Hugging Face model whose forward returns a ModelOutput and whose collate_fn renames
the items' keys, a module without forward, and the mistakes that used to surface after a whole training epoch (a
pooled layer, a dense net, ViT tokens without a reshape, a collate that loses items), now on the sanity batch or
before the first training step."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from panel_runs import campanel_warnings, trainer_for
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cubcam.callbacks import CAMPanel
from cubcam.callbacks.panel_render import MIN_TILE
from cubcam.callbacks.sources import normalization
from cubcam.cams.figure import GAP
from cubcam.cams.overlay import denormalize

DIGIT = 28  # px: MNIST's side
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


class Digits(Dataset):
    """28 px one-channel "digits" (a bright bar whose place is the class), normalised as torchvision's MNIST
    example normalises them: ``transform`` holds the ``Normalize`` (the dataset has no mean/std of its own)."""

    def __init__(self, count: int = 16, classes: int = 4, dict_items: bool = False):
        from torchvision import transforms

        self.transform = transforms.Compose([transforms.Normalize(MNIST_MEAN, MNIST_STD)])
        generator = torch.Generator().manual_seed(0)
        self.labels = [i % classes for i in range(count)]
        self.pixels = torch.rand(count, 1, DIGIT, DIGIT, generator=generator) * 0.1
        for i, label in enumerate(self.labels):
            self.pixels[i, 0, 4 + 5 * label : 8 + 5 * label, 6:22] = 1.0
        self.dict_items = dict_items

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.transform(self.pixels[i])
        return {"pixel_values": image, "label": self.labels[i]} if self.dict_items else (image, self.labels[i])


class DigitNet(pl.LightningModule):
    """An MNIST module's shape (lightning-hydra-template's): a small CNN, logits from ``forward``."""

    def __init__(self, outputs: int = 4):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, outputs),
        )  # fmt: skip
        self.steps = 0

    def forward(self, images):
        return self.net(images)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        images, labels = batch
        return F.cross_entropy(self(images)[:, :4], labels)  # an embedding's first dimensions as logits

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loaders(dataset: Dataset, **kwargs) -> tuple[DataLoader, DataLoader]:
    return DataLoader(dataset, batch_size=8, shuffle=True, **kwargs), DataLoader(dataset, batch_size=8, **kwargs)


@pytest.mark.parametrize("kind", ["classifier", "embedding"])
def test_grayscale_digits_get_a_panel_of_enlarged_gray_tiles(tmp_path, kind: str) -> None:
    """Before: every epoch warned "expected an image [3, H, W]" and drew nothing (an MNIST classifier, or a
    metric-learning embedding net as pytorch-metric-learning's MNIST example trains one)."""
    pl.seed_everything(0, verbose=False)
    module = DigitNet(4 if kind == "classifier" else 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        panel = CAMPanel(num_images=4, target_layer="net.3", finer="off", kind=kind)
        trainer_for(tmp_path, 1, [panel]).fit(module, *loaders(Digits()))
    assert campanel_warnings(caught) == []
    grid = np.asarray(Image.open(tmp_path / "cam_panels" / "epoch_000.png").convert("RGB"))
    factor = -(-MIN_TILE // DIGIT)  # 28 px -> 140 px
    strip = 2 * DIGIT * factor + GAP
    assert grid.shape[1] == 4 + 4 * (strip + 4)  # four strips of two enlarged cells
    assert grid.std() > 10
    evolution = Image.open(next((tmp_path / "cam_panels").glob("evolution_*.png")))
    assert evolution.width >= 2 * DIGIT + 8  # its thumbnails enlarged too (they are stored at 28 px)


def test_images_of_any_channel_count_are_drawn_with_the_dataset_s_normalization() -> None:
    dataset = Digits()
    mean, std = normalization(torch.utils.data.Subset(dataset, [0, 1]), channels=1)  # through the wrapper
    assert (mean, std) == ([0.1307], [0.3081])
    pixels = denormalize(dataset[0][0], mean, std)
    expected = (dataset.pixels[0, 0] * 255).round().to(torch.uint8).numpy()
    assert pixels.shape == (DIGIT, DIGIT, 3) and (pixels == expected[..., None]).all()  # gray: R = G = B
    four = torch.rand(4, 5, 5)  # e.g. RGB and near-infrared: the first three drawn
    assert (denormalize(four, [0.0], [1.0]) == (four[:3] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).all()
    with pytest.raises(ValueError, match="mean has 3 values for images of 1 channel"):
        denormalize(dataset[0][0])  # ImageNet's mean for a digit: said, not drawn wrongly


class HFClassifier(pl.LightningModule):
    """The Hugging Face image-classification tutorial's shape: the model returns an ``ImageClassifierOutput``;
    items have ``label``, the collate_fn makes ``labels``."""

    def __init__(self):
        super().__init__()
        from transformers import ResNetConfig, ResNetForImageClassification

        config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4)
        self.model = ResNetForImageClassification(config)

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values)

    def training_step(self, batch, batch_idx):
        return self.model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss

    def validation_step(self, batch, batch_idx):
        self(batch["pixel_values"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def hf_collate(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "labels": torch.tensor([item["label"] for item in items]),
    }


HF_LAYER = "model.resnet.encoder.stages.0"


def test_a_hugging_face_model_with_its_own_keys_gets_its_panel_from_epoch_0(tmp_path) -> None:
    """Before: the ModelOutput was refused ("must return logits"); with label_key="labels" epoch 0's panel was lost
    (dataset items have "label"), with "label" every batch failed."""
    pl.seed_everything(0, verbose=False)
    panel = CAMPanel(num_images=4, target_layer=HF_LAYER, output="logits", image_key="pixel_values", label_key="labels")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(tmp_path, 1, [panel]).fit(HFClassifier(), *loaders(Digits(dict_items=True), collate_fn=hf_collate))
    assert campanel_warnings(caught) == []
    assert (tmp_path / "cam_panels" / "epoch_000.png").is_file() and panel.panel is not None


def test_a_model_output_without_output_is_one_error_on_the_sanity_batch(tmp_path) -> None:
    module = HFClassifier()
    panel = CAMPanel(target_layer=HF_LAYER, image_key="pixel_values", label_key="labels")
    with pytest.raises(TypeError, match=r"returns a ImageClassifierOutputWithNoAttention \(its keys: 'logits'.*"
                       r"output='logits'"):  # fmt: skip
        trainer_for(tmp_path, 1, [panel], num_sanity_val_steps=1).fit(
            module, *loaders(Digits(dict_items=True), collate_fn=hf_collate)
        )


def test_a_module_without_forward_is_one_error_naming_what_to_define(tmp_path) -> None:
    class StepsCallTheModel(DigitNet):
        forward = pl.LightningModule.forward  # every step calls self.net(...)

    with pytest.raises(TypeError, match=r"has no forward .*def forward\(self, images\): return self\.net\(images\)"):
        trainer_for(tmp_path, 1, [CAMPanel(target_layer="net.3")]).fit(StepsCallTheModel(), *loaders(Digits()))


class Pooled(DigitNet):
    """Lightning's fine-tuning example's mistake: the whole feature extractor, pooled to 1x1, as the layer."""

    def __init__(self):
        super().__init__()
        layers = list(self.net)
        self.feature_extractor = nn.Sequential(*layers[:7])  # through the AdaptiveAvgPool2d: [B, 16, 1, 1]
        self.net = nn.Sequential(*layers[7:])

    def forward(self, images):
        return self.net(self.feature_extractor(images))


class Dense(DigitNet):
    """A dense net: no layer gives a map."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(DIGIT * DIGIT, 32), nn.ReLU(), nn.Linear(32, 4))


class Tokens(DigitNet):
    """A ViT's shape: 7x7 patches of 4 px, a class token first, a norm over the tokens [B, 1 + 49, D]."""

    def __init__(self):
        super().__init__()
        self.patches = nn.Conv2d(1, 16, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, images):
        tokens = self.patches(images).flatten(2).transpose(1, 2)
        tokens = self.norm(torch.cat([self.cls.expand(len(images), -1, -1), tokens], 1))
        return self.head(tokens[:, 0])


@pytest.mark.parametrize("sanity_steps", [1, 0], ids=["on the sanity batch", "before training"])
@pytest.mark.parametrize(
    ("module_class", "layer", "error", "message"),
    [
        (Pooled, "feature_extractor", ValueError, r"1x1 grid.* a map here is 'feature_extractor\.5' \(1, 16, 7, 7\)"),
        (Dense, "net.2", TypeError, r"a vector per image .*No layer of Dense gives a map"),
        (Tokens, "norm", TypeError, r"tokens \[B, 1 \+ 7x7, D\]: drop the class token .*t\[:, 1:\]\.reshape\(.*\)$"),
    ],
    ids=["pooled", "dense", "vit tokens"],
)
def test_a_layer_that_gives_no_map_fails_before_any_training_step_naming_the_fix(
    tmp_path, sanity_steps: int, module_class, layer: str, error: type, message: str
) -> None:
    """Before: each was reported at epoch 0's end, after a whole epoch of training (the sanity check was skipped)."""
    module = module_class()
    with pytest.raises(error, match=message):
        trainer_for(tmp_path, 1, [CAMPanel(target_layer=layer)], num_sanity_val_steps=sanity_steps).fit(
            module, *loaders(Digits())
        )
    assert module.steps == 0


def test_the_check_before_training_leaves_the_trained_weights_bit_identical(tmp_path) -> None:
    weights = []
    for callbacks in ([], [CAMPanel(num_images=2, target_layer="net.3", every_n_epochs=5)]):
        pl.seed_everything(0, verbose=False)
        module = DigitNet()
        trainer_for(tmp_path, 1, callbacks).fit(module, *loaders(Digits()))
        weights.append([p.detach().clone() for p in module.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


@pytest.mark.parametrize(
    ("collate", "message"),
    [
        (lambda items: hf_collate(items[:-1]), r"collate_fn .* made 1 images and 1 labels of 2 dataset items"),
        (
            lambda items: {**hf_collate(items), "pixel_values": hf_collate(items)["pixel_values"].to(torch.uint8)},
            r"collate_fn .* gives torch.uint8 images",
        ),
    ],
    ids=["loses an item", "uint8 images"],
)
def test_a_collate_the_panel_cannot_read_items_through_is_one_error_naming_it(tmp_path, collate, message) -> None:
    panel = CAMPanel(target_layer=HF_LAYER, output="logits", image_key="pixel_values", label_key="labels")
    module = HFClassifier()
    with pytest.raises(TypeError, match=message):
        trainer_for(tmp_path, 1, [panel]).fit(module, *loaders(Digits(dict_items=True), collate_fn=collate))
