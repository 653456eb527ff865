"""Training images/s: our Lightning ``fit`` of ``cubcam.train.modules.Classifier`` against a plain PyTorch loop,
in one run.

Both sides share everything but the loop: the same net (same seed), the same DataLoader object (synthetic CUB,
the training transform), AdamW + cosine schedule from ``cubcam.train.modules.build_optimizer``, cross-entropy. The
Lightning side is our module's ``training_step`` (with its ``train/loss`` / ``train/acc`` logging) under a Trainer
without logger, checkpointing, progress bar or validation, which would only add I/O that a plain loop lacks too.
Runs alternate Lightning, plain, plain, Lightning (ABBA, so drifting machine load hits both alike); the first
epoch of each run is warm-up and not timed; the median epoch throughput of each side is reported.

    python bench/train_throughput.py [--epochs 3] [--arch resnet18] [--size 128] [--batch 16] [--workers 0]

Target: Lightning >= 0.95x the plain loop.
"""

from __future__ import annotations

import cubcam.train  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.data.synthetic import make_synthetic_cub
from cubcam.train.modules import Classifier, build_optimizer


class EpochTimer(pl.Callback):
    """Wall time of each training epoch, loop included (what a user waits for)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def lightning_epochs(args: argparse.Namespace, loader: DataLoader, num_classes: int) -> list[float]:
    torch.manual_seed(0)
    module = Classifier(arch=args.arch, num_classes=num_classes, output_stride=args.output_stride)
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return timer.seconds[1:]


def plain_epochs(args: argparse.Namespace, loader: DataLoader, num_classes: int) -> list[float]:
    torch.manual_seed(0)
    module = Classifier(arch=args.arch, num_classes=num_classes, output_stride=args.output_stride)
    net, hp = module.net.train(), module.hparams
    optimizer, scheduler = build_optimizer(
        net, hp.lr, hp.weight_decay, hp.backbone_lr_factor, args.epochs * len(loader)
    )
    seconds = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        for batch in loader:
            loss = F.cross_entropy(net(batch["image"]), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--output-stride", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=16)
    parser.add_argument("--root", type=Path, default=None, help="an existing CUB-format dataset (default: synthetic)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or make_synthetic_cub(
            Path(tmp) / "cub", classes=args.classes, per_class=args.per_class, size=args.size, seed=0
        )
        data = CUBDataModule(root=str(root), image_size=args.size, batch_size=args.batch, num_workers=args.workers)
        data.setup("fit")
        loader = data.train_dataloader()
        images = len(loader.dataset)
        results: dict[str, list[float]] = {"lightning": [], "plain": []}
        for name in ("lightning", "plain", "plain", "lightning"):
            run = lightning_epochs if name == "lightning" else plain_epochs
            results[name] += [images / s for s in run(args, loader, data.num_classes)]

    print(
        f"{args.arch} at {args.size} px, batch {args.batch}, {images} training images, "
        f"{torch.get_num_threads()} threads, {args.workers} loader workers"
    )
    median = {name: statistics.median(rates) for name, rates in results.items()}
    for name, rates in results.items():
        print(f"  {name:<10} {median[name]:7.1f} img/s  (epochs: {', '.join(f'{r:.1f}' for r in rates)})")
    print(f"  Lightning / plain = {median['lightning'] / median['plain']:.3f}x  (target >= 0.95x)")


if __name__ == "__main__":
    main()
