"""Images/s of ``cubcam evaluate`` against one plain eval forward over the same split, in one run.

For each model kind (a Classifier: GradCAM; an EmbeddingNet: EmbeddingCAM with both proxy schemes) the split is
loaded into memory once, then, interleaved ``--repeats`` times so machine noise hits both alike (median reported):

- forward only: ``module(images)`` per batch under ``torch.inference_mode()`` — the floor;
- evaluate: ``cubcam.train.evaluate.localization_scores`` on the same batches — the hooked forward, head-only CAMs for
  every method, upsampling, and the MaxBoxAccV2 / heatmap-ratio / pointing-game bookkeeping of every method and of
  the centre-Gaussian baseline (what ``cubcam evaluate`` does per batch, minus reading the JPEGs).

Then ``cubcam evaluate`` itself runs end to end (JPEG decoding, checkpoint loading, reference cache) once cold
(the embedding net's reference split is embedded and cached) and once warm, beside a plain forward that reads the
same JPEGs through the same DataLoader. Weights are random: speed does not depend on them.

    python bench/evaluate_speed.py [--arch resnet18] [--size 128] [--classes 8] [--per-class 30] [--batch 32]

Target: evaluate >= 0.7x the forward-only throughput.
"""

from __future__ import annotations

import cubcam.cams  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch

from cubcam.cams.targets import ClassLogits, Target
from cubcam.train.checkpoint import load_checkpoint
from cubcam.train.data.cub import CUBDataset
from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.data.presets import EvalPreset
from cubcam.train.data.synthetic import make_synthetic_cub
from cubcam.train.evaluate import localization_scores
from cubcam.train.evaluate import main as evaluate_main
from cubcam.train.modules import Classifier, EmbeddingNet
from cubcam.train.reference import loader, reference_set


def save_checkpoint(module: pl.LightningModule, data: CUBDataModule, path: Path) -> Path:
    """A checkpoint as ``cubcam fit`` writes it (datamodule hyper-parameters included), without training."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(path)
    return path


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--output-stride", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)

    work = Path(tempfile.mkdtemp(prefix="cubcam-bench-"))
    root = make_synthetic_cub(work / "cub", classes=args.classes, per_class=args.per_class, size=args.size).parent
    data = CUBDataModule(root=str(root), image_size=args.size, batch_size=args.batch, num_workers=0)
    split = CUBDataset(root, split="test", transform=EvalPreset(args.size))
    batches = list(loader(split, args.batch, 0))  # in memory: both sides time compute, not JPEG decoding
    n = len(split)
    print(
        f"{args.arch} (output stride {args.output_stride}), {n} test images at {args.size} px, batch {args.batch}, "
        f"CPU threads={torch.get_num_threads()}, median of {args.repeats}"
    )
    print(
        f"{'model':<11}{'forward img/s':>15}{'evaluate img/s':>16}{'ratio':>8}   "
        f"{'cubcam evaluate end to end (cold / warm) vs forward+JPEG img/s':<40}"
    )

    kinds = {"classifier": Classifier, "embedding": EmbeddingNet}
    for kind, cls in kinds.items():
        module = cls(
            arch=args.arch, output_stride=args.output_stride, num_classes=data.num_classes, class_names=data.class_names
        )
        ckpt = save_checkpoint(module, data, work / f"{kind}.ckpt")
        module = load_checkpoint(ckpt).module
        targets: dict[str, Target] = {"gradcam": ClassLogits()}  # what evaluate scores by default
        if kind == "embedding":
            reference = reference_set(
                module, ckpt, root, split="train", image_size=args.size, batch_size=args.batch, cache=False
            )
            targets = {f"gradcam/{scheme}": target for scheme, target in reference.targets(0).items()}

        def forward_only() -> None:
            with torch.inference_mode():
                for batch in batches:
                    module(batch["image"])

        def evaluate() -> None:
            methods = {name: (target, "gradcam") for name, target in targets.items()}
            localization_scores(module, batches, methods, torch.device("cpu"), n, progress=False)

        forward_only(), evaluate()  # warm-up: allocator, thread pools, lazy imports
        times: dict[str, list[float]] = {"forward": [], "evaluate": []}
        for _ in range(args.repeats):
            times["forward"].append(timed(forward_only))
            times["evaluate"].append(timed(evaluate))
        forward_ips, evaluate_ips = (n / statistics.median(times[k]) for k in ("forward", "evaluate"))

        def forward_from_disk() -> None:
            with torch.inference_mode():
                for batch in loader(split, args.batch, 0):
                    module(batch["image"])

        def end_to_end() -> None:
            with contextlib.redirect_stdout(io.StringIO()):
                evaluate_main(
                    [
                        str(ckpt),
                        "--out",
                        str(work / f"{kind}-eval"),
                        "--num-workers",
                        "0",
                        "--batch-size",
                        str(args.batch),
                    ]
                )

        cold = timed(end_to_end)  # the embedding net embeds and caches its reference split here
        warm = statistics.median(timed(end_to_end) for _ in range(args.repeats))
        disk = statistics.median(timed(forward_from_disk) for _ in range(args.repeats))
        print(
            f"{kind:<11}{forward_ips:>15.1f}{evaluate_ips:>16.1f}{evaluate_ips / forward_ips:>7.2f}x   "
            f"{n / cold:.1f} / {n / warm:.1f} vs {n / disk:.1f} ({(n / warm) / (n / disk):.2f}x warm)"
        )


if __name__ == "__main__":
    main()
