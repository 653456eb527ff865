"""Explain your own training run: a plain LightningModule around a timm model, fed ``(images, labels)`` batches
by a torchvision ``ImageFolder``, with cubcam's ``CAMPanel`` told only which layer to explain.

    python examples/own_module.py [--data data/synthetic_cub] [--arch convnext_atto] [--epochs 3] [--out runs/own]

Nothing in the module knows cubcam: ``CAMPanel(target_layer="model.stages.3")`` runs its own eval-mode forward and
backward on the panel images every epoch, reuses the outputs of the module's own ``self(images)`` calls, and
draws the panel without boxes (an ``ImageFolder`` has none; with dict batches carrying ``box`` it also logs the CAM
localization metrics). The panel goes to W&B (offline here; ``wandb sync`` uploads it) and to PNG files under
``<out>/``. Without data at ``--data`` it writes the synthetic CUB-format set there first (CUB's own
``CUB_200_2011/images`` folder is an ``ImageFolder`` too).
"""

from __future__ import annotations

import cubcam  # noqa: F401  (first: its torchvision guard, before timm and torchvision)

# isort: split

import argparse
from pathlib import Path

import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import WandbLogger
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from cubcam.callbacks import CAMPanel
from cubcam.train.data.synthetic import make_synthetic_cub


class LitClassifier(pl.LightningModule):
    """A plain classifier: any timm model, cross-entropy, AdamW. It reads tuple or dict batches."""

    def __init__(self, arch: str = "convnext_atto", num_classes: int = 8, lr: float = 2e-3):
        super().__init__()
        self.save_hyperparameters()
        self.model = timm.create_model(arch, pretrained=False, num_classes=num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    @staticmethod
    def unpack(batch: tuple[Tensor, Tensor] | dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return (batch["image"], batch["label"]) if isinstance(batch, dict) else (batch[0], batch[1])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = self.unpack(batch)
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = self.unpack(batch)
        logits = self(images)  # CAMPanel keeps these outputs: no second forward for them
        self.log("val/loss", F.cross_entropy(logits, labels))
        self.log("val/acc", (logits.argmax(1) == labels).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def image_folder_loaders(root: Path, size: int, batch_size: int) -> tuple[DataLoader, DataLoader, list[str]]:
    """``ImageFolder`` over ``<root>/CUB_200_2011/images``: every fourth image validates, the rest trains."""
    normalize = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), normalize])
    images = datasets.ImageFolder(str(root / "CUB_200_2011" / "images"), transform=transform)
    val = Subset(images, range(0, len(images), 4))
    train = Subset(images, [i for i in range(len(images)) if i % 4])
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True),
        DataLoader(val, batch_size=batch_size),  # in order: CAMPanel reads its panel from it by index
        images.classes,
    )


def main(argv: list[str] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/synthetic_cub"))
    parser.add_argument("--arch", default="convnext_atto")
    parser.add_argument("--layer", default="model.stages.3", help="the layer to explain, a dotted name in the module")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/own"))
    args = parser.parse_args(argv)
    if not (args.data / "CUB_200_2011" / "images").is_dir():
        make_synthetic_cub(args.data, classes=8, per_class=16, size=128, seed=0)
    train, val, classes = image_folder_loaders(args.data, args.size, args.batch_size)

    pl.seed_everything(0)
    module = LitClassifier(args.arch, num_classes=len(classes))
    module.class_names = [name.split(".", 1)[-1].replace("_", " ") for name in classes]  # for the captions
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=WandbLogger(project="cubcam-own", save_dir=str(args.out), offline=True),
        callbacks=[CAMPanel(target_layer=args.layer, num_images=8)],
        log_every_n_steps=5,
        default_root_dir=str(args.out),
    )
    trainer.fit(module, train, val)
    return trainer


if __name__ == "__main__":
    main()
