"""What ``cubcam.callbacks.CAMPanel`` costs a GPU-bound training loop: epoch time with and without it, in one run.

No GPU here, so the benchmark simulates what a GPU would see. The training step and the model's forward wait
(``time.sleep``: the CPU stays idle, as beside a GPU) for the GPU time of the real workload, ResNet-50 at 224 px
with mixed precision on an A100 (about 2,470 images/s: 0.4 ms per image, a third of it the forward), on CUB's real
sizes: 5,394 training images (batches of 64), 600 validation images of 224 px with boxes, the callback's default
metric subset, the CAM layer's real channels (2,048) and grid (7x7 at output stride 32, 14x14 at 16). The model
is a tiny net with that layer: the images average-pooled to the grid, a 1x1 convolution to the channels, a ReLU
(the CAM layer), a pooled linear head (200 logits, or a 128-d embedding). The batches live in memory.

Scenarios (``--scenarios``): ``classifier`` / ``embedding`` through the CAM protocol (head-only maps from the loop's
own activations), and ``classifier-layer`` / ``embedding-layer`` through ``target_layer=`` (a module that knows
nothing of cubcam: the callback's own forward and backward, through the waiting model, for the panel and the
metric subset), each at output stride 32 and 16 (``--strides``). W&B (offline) and TensorBoard on both sides.

An epoch is timed from ``on_train_epoch_start`` to ``on_train_epoch_end`` (training plus validation); the first
epoch of each run is warm-up (the panel is chosen there). Runs alternate without, with, with, without (ABBA);
medians. "Blocked" is the time the loop spent inside the callback's hooks, split into device work (keeping the
batch's rows, the maps at the grid, the gathers, the callback's own forwards: kernels on a GPU, CPU work here) and
host work (the hand-over, W&B's log call, the metrics to every logger, waiting for a worker behind), the part a
GPU would see; fit's end waits for the last epoch's work apart.

    python bench/callback_overhead.py [--epochs 4] [--scenarios classifier embedding] [--strides 32 16]
    python bench/callback_overhead.py --device cuda       # the same scenarios on a real GPU (bench/gpu.sh)

Target: the callback costs <= 2% of the simulated GPU epoch, both kinds, both paths, default settings.
"""

from __future__ import annotations

import cubcam.train  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cubcam.callbacks import CAMPanel
from cubcam.cams.protocol import CAMStepOutput, step_output

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import EpochTimer

TRAIN_IMAGES, VAL_IMAGES, BATCH, SIZE, CLASSES, EMBEDDING = 5394, 600, 64, 224, 200, 128
IMAGE_MS = 0.4  # GPU time per training image (forward + backward), A100, ResNet-50, AMP
FORWARD_SHARE = 1 / 3
GPU_EPOCH = (TRAIN_IMAGES // BATCH * BATCH + FORWARD_SHARE * VAL_IMAGES) * IMAGE_MS / 1000  # the waits alone


def wait(seconds: float, on: Tensor) -> None:
    """The GPU's time: on a CPU the thread sleeps; on a GPU a kernel spins that long (the host queues it and goes on,
    as it does with real kernels)."""
    if on.is_cuda:
        torch.cuda._sleep(int(seconds * cycles_per_second()))
    else:
        time.sleep(seconds)


@functools.cache
def cycles_per_second() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(10**7)  # warm-up
    start.record()
    torch.cuda._sleep(10**8)
    end.record()
    end.synchronize()
    return 10**8 / (start.elapsed_time(end) / 1000)


class GPUTime(torch.autograd.Function):
    """The identity that waits, forward and backward, for a GPU's time on the batch."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, forward_s: float, backward_s: float) -> Tensor:
        ctx.backward_s = backward_s
        wait(forward_s, x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        wait(ctx.backward_s, grad)
        return grad, None, None


class TinyNet(nn.Module):
    """The real CAM layer's grid and channels, next to no compute; ``forward`` waits for ResNet-50's GPU time.

    Training goes through ``train_forward``, which only waits (a linear layer on 3 numbers per image): the real
    layer's activations (64 x 2048 x 7 x 7 floats a batch, 25 MB) would cost this CPU about 50 ms a step forward and
    backward, more than the GPU's step it stands for, and a CPU-bound loop is not what a GPU's host sees. Validation
    makes them (it feeds the callback), at about 15 ms a batch here.
    """

    def __init__(self, stride: int, channels: int, outputs: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(3, channels, 1)
        self.cam = nn.ReLU()  # the CAM layer: [B, channels, 224 / stride, 224 / stride]
        self.fc = nn.Linear(channels, outputs)
        self.train_fc = nn.Linear(3, outputs)

    def forward_features(self, images: Tensor) -> Tensor:
        features = self.conv(F.avg_pool2d(images, self.stride))  # in the graph: its backward waits too
        return self.cam(GPUTime.apply(features, *self.gpu_time(len(images))))

    def forward_head(self, activations: Tensor) -> Tensor:
        return self.fc(activations.mean((2, 3)))

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    def train_forward(self, images: Tensor) -> Tensor:
        return GPUTime.apply(self.train_fc(images[:, :, 0, 0]), *self.gpu_time(len(images)))  # its backward waits

    @staticmethod
    def gpu_time(batch: int) -> tuple[float, float]:
        """(forward, backward) seconds of the GPU's time on ``batch`` images."""
        per_batch = IMAGE_MS / 1000 * batch
        return FORWARD_SHARE * per_batch, (1 - FORWARD_SHARE) * per_batch


class Simulated(pl.LightningModule):
    """The CAM protocol on :class:`TinyNet` (``cam_method``, ``cam_target_layer``, ``forward_head`` and a
    ``validation_step`` returning the activations); a cross-entropy or a plain embedding loss."""

    cam_reshape = None

    def __init__(self, stride: int, channels: int, embedding: bool):
        super().__init__()
        self.net = TinyNet(stride, channels, EMBEDDING if embedding else CLASSES)
        self.cam_method = "embeddingcam" if embedding else "gradcam"

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.net.cam

    def forward_head(self, activations: Tensor) -> Tensor:
        return self.net.forward_head(activations)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        output = self.net.train_forward(batch["image"])
        if self.cam_method == "embeddingcam":
            return output.pow(2).mean()
        return F.cross_entropy(output, batch["label"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> CAMStepOutput:
        activations = self.net.forward_features(batch["image"])
        output = self.net.forward_head(activations)
        self.log("val/loss", output.float().pow(2).mean())
        return step_output(activations, output, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class Plain(Simulated):
    """The same, as a module that knows nothing of cubcam (``target_layer="net.cam"``): validation just calls
    ``self(images)``."""

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:  # type: ignore[override]
        self.log("val/loss", self(batch["image"]).float().pow(2).mean())


class ValSet(Dataset[dict[str, Any]]):
    """600 in-memory 224 px images with a label, a box and the dataset index."""

    def __init__(self, size: int = VAL_IMAGES):
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.arange(size) % CLASSES
        corner = torch.randint(0, SIZE // 2, (size, 2), generator=generator).float()
        extent = torch.randint(SIZE // 4, SIZE // 2, (size, 2), generator=generator).float()
        self.boxes = torch.cat([corner, extent], 1)
        # A bird: a bright blob filling its box, on a smooth background (maps with a few regions, as real CAMs
        # have; white noise would make every map a labelling worst case).
        background = F.interpolate(torch.randn(size, 3, 8, 8, generator=generator), size=SIZE, mode="bilinear")
        ys, xs = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
        centre, half = corner + extent / 2, extent / 2
        blob = torch.exp(
            -(((xs - centre[:, 0, None, None]) / half[:, 0, None, None]) ** 2)
            - ((ys - centre[:, 1, None, None]) / half[:, 1, None, None]) ** 2
        )
        self.images = 0.5 * background + 2 * blob[:, None]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": int(self.labels[i]), "box": self.boxes[i], "index": i}


class TrainBatches(Dataset[dict[str, Tensor]]):
    """CUB's training split as ready batches (no collation on the loop's thread, as with loader workers)."""

    def __init__(self, device: torch.device):
        generator = torch.Generator().manual_seed(1)
        self.batch = {
            "image": torch.randn(BATCH, 3, SIZE, SIZE, generator=generator).to(device),
            "label": torch.randint(0, CLASSES, (BATCH,), generator=generator).to(device),
        }

    def __len__(self) -> int:
        return TRAIN_IMAGES // BATCH

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.batch


HOOKS = (
    "on_train_batch_end",
    "on_validation_epoch_start",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_validation_epoch_end",
)


class TimedCAMPanel(CAMPanel):
    """CAMPanel adding up the time the loop's thread spends in its hooks, per epoch, and apart from it the part
    that is device work (keeping the batch's rows, the maps at the grid and the gathers: kernels on a GPU, CPU work
    here); and fit's end apart."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.blocked: list[float] = []
        self.device: list[float] = []
        self.logging: list[float] = []
        self.at_end = 0.0
        for hook in HOOKS:
            setattr(self, hook, self._timed(getattr(self, hook), self.blocked))
        for part in ("on_validation_batch_end", "_epoch_work"):
            setattr(self, part, self._timed(getattr(self, part), self.device))
        self._log_finished = self._timed(self._log_finished, self.logging)  # type: ignore[method-assign]

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.blocked.append(0.0)
        self.device.append(0.0)
        self.logging.append(0.0)

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        start = time.perf_counter()
        self.logging.append(0.0)  # the drain's logging is fit's end, not the last epoch's
        super().on_fit_end(trainer, module)
        self.logging.pop()
        self.at_end = time.perf_counter() - start

    @staticmethod
    def _timed(hook: Any, clock: list[float]) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                if clock:
                    clock[-1] += time.perf_counter() - start

        return timed


def run(args: argparse.Namespace, work: Path, kind: str, stride: int, with_panel: bool) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    device = torch.device(args.device)
    layer = kind.endswith("-layer")
    embedding = kind.startswith("embedding")
    module = (Plain if layer else Simulated)(stride, args.channels, embedding)
    clock = EpochTimer()
    panel = None
    if with_panel:
        options: dict[str, Any] = {"target_layer": "net.cam", "method": "embeddingcam" if embedding else "gradcam"}
        panel = TimedCAMPanel(**(options if layer else {}))
    wandb_logger = WandbLogger(project="cubcam-bench", save_dir=str(work), offline=True)
    loggers = [wandb_logger, TensorBoardLogger(str(work), name="tensorboard")]
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=loggers,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[panel, clock] if panel else [clock],
    )
    train = DataLoader(TrainBatches(device), batch_size=None)
    val = DataLoader(VAL, batch_size=BATCH, pin_memory=device.type == "cuda")
    trainer.fit(module, train, val)
    wandb_logger.experiment.finish()
    return {
        "epochs": clock.seconds[1:],
        "blocked": panel.blocked[1:] if panel else [],
        "device": panel.device[1:] if panel else [],
        "logging": panel.logging[1:] if panel else [],
        "at_end": panel.at_end if panel else 0.0,
        "logged": sorted(panel.history) if panel else [],
    }


def scenario(args: argparse.Namespace, work: Path, kind: str, stride: int) -> None:
    sides: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for with_panel in (False, True, True, False):
        sides[with_panel].append(run(args, work, kind, stride, with_panel))
    without = statistics.median(s for r in sides[False] for s in r["epochs"])
    with_ = statistics.median(s for r in sides[True] for s in r["epochs"])
    blocked = statistics.median(s for r in sides[True] for s in r["blocked"])
    device = statistics.median(s for r in sides[True] for s in r["device"])
    host = statistics.median(b - d for r in sides[True] for b, d in zip(r["blocked"], r["device"]))
    logging = statistics.median(s for r in sides[True] for s in r["logging"])
    at_end = statistics.median(r["at_end"] for r in sides[True])
    grid = SIZE // stride
    print(
        f"{kind} at output stride {stride} ({grid}x{grid} x {args.channels} channels): epoch without "
        f"{without:.3f} s, with {with_:.3f} s ({100 * (with_ / without - 1):+.1f}%); the loop blocked in the "
        f"callback {1000 * blocked:.0f} ms = {100 * blocked / without:.1f}% of the epoch: device work "
        f"{1000 * device:.0f} ms, host work {1000 * host:.0f} ms = {100 * host / GPU_EPOCH:.1f}% of the "
        f"{GPU_EPOCH:.2f} s simulated GPU epoch (target <= 2%), of which logging {1000 * logging:.0f} ms; fit's end "
        f"waited {at_end:.2f} s for the last epoch; "
        f"epochs logged {sides[True][0]['logged']}",
        flush=True,
    )


VAL = ValSet()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is warm-up")
    kinds = ["classifier", "embedding", "classifier-layer", "embedding-layer"]
    parser.add_argument("--scenarios", nargs="+", default=kinds, choices=kinds)
    parser.add_argument("--strides", nargs="+", type=int, default=[32, 16], choices=[32, 16])
    parser.add_argument("--channels", type=int, default=2048, help="of the CAM layer (ResNet-50's layer4: 2048)")
    parser.add_argument("--device", default="cpu", help="cpu (simulated GPU time) or cuda")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    print(
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, device {args.device}; {TRAIN_IMAGES} train "
        f"/ {VAL_IMAGES} val images at {SIZE} px, {IMAGE_MS} ms GPU time per training image; {args.epochs} epochs "
        f"per run (first = warm-up), ABBA",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for stride in args.strides:
            for kind in args.scenarios:
                scenario(args, Path(tmp), kind, stride)


if __name__ == "__main__":
    main()
