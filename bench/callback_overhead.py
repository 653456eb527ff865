"""What ``cubcam.callbacks.CAMPanel`` costs a GPU-bound training loop: epoch time and CPU time with and without it.

No GPU here, so the benchmark simulates what a GPU would see. The training step and the model's forward wait
(``time.sleep``: the CPU stays idle, as beside a GPU) for the GPU time of the real workload, ResNet-50 at 224 px
with mixed precision on an A100 (about 2,470 images/s: 0.4 ms per image, a third of it the forward), on CUB's real
sizes: 5,394 training images (batches of 64), 600 validation images of 224 px with boxes, the callback's default
metric subset (512), the CAM layer's real channels (2,048) and grid (7x7 at output stride 32, 14x14 at 16). The
model is a tiny net with that layer: the images average-pooled to the grid, a 1x1 convolution to the channels, a
ReLU (the CAM layer), a pooled linear head (200 logits, or a 128-d embedding). The batches live in memory. The box
labeller of MaxBoxAccV2 is stood in by a wait too (``--labeller projected``): its projected GPU time, 47 ms for 512
maps of 224 px (``bench/localization_speed.py``), with no hits; ``--labeller real`` runs the real one (on a GPU
with ``--device cuda``: ``bench/gpu.sh``).

Scenarios (``--scenarios``): ``classifier`` / ``embedding`` through the CAM protocol (head-only maps from the loop's
own activations), and ``classifier-layer`` / ``embedding-layer`` through ``target_layer=`` (a module that knows
nothing of cubcam: the callback's own forward and backward, through the waiting model, for the panel and the
metric subset), each at output stride 32 and 16 (``--strides``). W&B (offline) and TensorBoard on both sides.

An epoch is timed from ``on_train_epoch_start`` to ``on_train_epoch_end`` (training plus validation); the first
epoch of each run is warm-up. Runs alternate without, with, with, without (ABBA); medians. Per epoch it reports:
the wall time with vs without; the CPU time of the whole process tree (every thread, and child processes such as
wandb-core) with minus without, the callback's CPU cost; and of that, the loop's device work (the maps, their
upsampling and the box metrics other than the labeller, kernels on a GPU and CPU work here: the wall time inside
``epoch_maps`` less the labeller's wait) and the picture thread's CPU time. fit's end (the last pictures and the
evolution) is reported apart.

    python bench/callback_overhead.py [--epochs 4] [--scenarios classifier embedding] [--strides 32 16]
        [--finer wrong|every|off]
    python bench/callback_overhead.py --device cuda       # the same scenarios on a real GPU (bench/gpu.sh)

Targets: epoch time within 2% of the run without the callback; the callback's own CPU time <= 0.5 CPU-s an epoch,
the labeller's device time excluded.
"""

from __future__ import annotations

import cubcam.train  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import argparse
import functools
import os
import statistics
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

from cubcam.callbacks import CAMPanel, cam_panel, picture_thread
from cubcam.cams import localization
from cubcam.cams.protocol import CAMStepOutput, step_output

TRAIN_IMAGES, VAL_IMAGES, BATCH, SIZE, CLASSES, EMBEDDING = 5394, 600, 64, 224, 200, 128
IMAGE_MS = 0.4  # GPU time per training image (forward + backward), A100, ResNet-50, AMP
FORWARD_SHARE = 1 / 3
GPU_EPOCH = (TRAIN_IMAGES // BATCH * BATCH + FORWARD_SHARE * VAL_IMAGES) * IMAGE_MS / 1000  # the waits alone
LABELLER_S_PER_MAP = 0.047 / 512  # the torch labeller's projected GPU time at 224 px (bench/localization_speed.py)
TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and every live descendant (wandb-core, worker processes), from
    /proc: every thread counted."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        times[pid] = (int(fields[11]) + int(fields[12])) / TICKS
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


def projected_labeller(seconds_per_map: float) -> Any:
    """A stand-in for ``cubcam.cams.localization._box_hits``: waits the labeller's projected GPU time, finds no hit."""

    def box_hits(cams: Tensor, gt: Tensor, thresholds: Any, iou_thresholds: Any, *args: Any) -> Tensor:
        time.sleep(seconds_per_map * len(cams))
        return torch.zeros(len(cams), len(thresholds), len(iou_thresholds), dtype=torch.bool, device=cams.device)

    return box_hits


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
    """The CAM protocol on :class:`TinyNet` (``cam_kind``, ``cam_target_layer``, ``forward_head`` and a
    ``validation_step`` returning the activations); a cross-entropy or a plain embedding loss."""

    cam_reshape = None

    def __init__(self, stride: int, channels: int, embedding: bool):
        super().__init__()
        self.net = TinyNet(stride, channels, EMBEDDING if embedding else CLASSES)
        self.cam_kind = "embedding" if embedding else "classifier"

    @property
    def cam_target_layer(self) -> nn.Module:
        return self.net.cam

    def forward_head(self, activations: Tensor) -> Tensor:
        return self.net.forward_head(activations)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        output = self.net.train_forward(batch["image"])
        if self.cam_kind == "embedding":
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


class Clock(pl.Callback):
    """Per training epoch (validation included): its wall time and the process tree's CPU time."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.cpu: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._start, self._cpu = time.perf_counter(), tree_cpu_seconds()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        self.cpu.append(tree_cpu_seconds() - self._cpu)


class TimedCAMPanel(CAMPanel):
    """CAMPanel adding up, per epoch, the loop's wall time in its hooks, the device work in them (the epoch's maps
    and metrics, less the labeller's wait) and the picture thread's CPU time; and fit's end apart."""

    def __init__(self, labeller_wait: list[float], **kwargs: Any):
        super().__init__(**kwargs)
        self.blocked: list[float] = []
        self.blocked_cpu: list[float] = []  # the loop thread's CPU seconds in the hooks
        self.device_cpu_loop: list[float] = []  # ... of which in the device work
        self.device: list[float] = []  # CPU seconds, every thread (torch's intra-op threads work for it)
        self.device_wall: list[float] = []
        self.pictures: list[float] = []
        self.at_end = 0.0
        self.labeller_wait = labeller_wait  # seconds the labeller stand-in waited, per epoch (last entry)
        for hook in HOOKS:
            setattr(self, hook, self._timed(getattr(self, hook), self.blocked, self.blocked_cpu))
        epoch_maps, draw = cam_panel.epoch_maps, picture_thread.draw
        self.on_validation_batch_end = self._device_work(self.on_validation_batch_end)  # type: ignore[method-assign]
        timed_maps = self._device_work(epoch_maps)

        def timed_draw(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return draw(*args, **kwargs)
            finally:
                if self.pictures:
                    self.pictures[-1] += time.thread_time() - start

        cam_panel.epoch_maps, picture_thread.draw = timed_maps, timed_draw  # type: ignore[assignment]
        self._restore = (epoch_maps, draw)

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        clocks = (self.blocked, self.blocked_cpu, self.device, self.device_cpu_loop, self.device_wall, self.pictures)
        for clock in (*clocks, self.labeller_wait):
            clock.append(0.0)

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        start = time.perf_counter()
        super().on_fit_end(trainer, module)
        self.at_end = time.perf_counter() - start
        cam_panel.epoch_maps, picture_thread.draw = self._restore  # type: ignore[assignment]

    def _device_work(self, part: Any) -> Any:
        """``part`` timed as device work: CPU seconds of every thread and wall seconds, less the labeller's wait."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            start, wall, waited = time.process_time(), time.perf_counter(), self.labeller_wait[-1]
            own = time.thread_time()
            try:
                return part(*args, **kwargs)
            finally:
                if self.device:
                    self.device[-1] += time.process_time() - start
                    self.device_cpu_loop[-1] += time.thread_time() - own
                    self.device_wall[-1] += time.perf_counter() - wall - (self.labeller_wait[-1] - waited)

        return timed

    @staticmethod
    def _timed(hook: Any, clock: list[float], cpu: list[float]) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, own = time.perf_counter(), time.thread_time()
            try:
                return hook(*args, **kwargs)
            finally:
                if clock:
                    clock[-1] += time.perf_counter() - start
                    cpu[-1] += time.thread_time() - own

        return timed


def run(args: argparse.Namespace, work: Path, kind: str, stride: int, with_panel: bool) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    device = torch.device(args.device)
    layer = kind.endswith("-layer")
    embedding = kind.startswith("embedding")
    module = (Plain if layer else Simulated)(stride, args.channels, embedding)
    clock = Clock()
    panel = None
    waits = [0.0]
    if with_panel:
        options: dict[str, Any] = {"target_layer": "net.cam", "kind": "embedding" if embedding else "classifier"}
        panel = TimedCAMPanel(waits, finer=args.finer, **(options if layer else {}))
    hits = localization._box_hits
    if args.labeller == "projected":
        stand_in = projected_labeller(LABELLER_S_PER_MAP)

        def counted(cams: Tensor, *rest: Any) -> Tensor:
            start = time.perf_counter()
            try:
                return stand_in(cams, *rest)
            finally:
                waits[-1] += time.perf_counter() - start

        localization._box_hits = counted
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
    try:
        trainer.fit(module, train, val)
    finally:
        localization._box_hits = hits
    wandb_logger.experiment.finish()
    return {
        "epochs": clock.seconds[1:],
        "cpu": clock.cpu[1:],
        "blocked": panel.blocked[1:] if panel else [],
        "device": panel.device[1:] if panel else [],
        "device_wall": panel.device_wall[1:] if panel else [],
        "pictures": panel.pictures[1:] if panel else [],
        "host_cpu": [b - d for b, d in zip(panel.blocked_cpu[1:], panel.device_cpu_loop[1:])] if panel else [],
        "at_end": panel.at_end if panel else 0.0,
        "logged": sorted(k for k in trainer.callback_metrics if k.startswith("val/cam_")),
    }


def scenario(args: argparse.Namespace, work: Path, kind: str, stride: int) -> None:
    sides: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for with_panel in (False, True, True, False):
        sides[with_panel].append(run(args, work, kind, stride, with_panel))

    def median(side: bool, key: str) -> float:
        return statistics.median(s for r in sides[side] for s in r[key])

    without, with_ = median(False, "epochs"), median(True, "epochs")
    cpu = median(True, "cpu") - median(False, "cpu")
    device, pictures, blocked = median(True, "device"), median(True, "pictures"), median(True, "blocked")
    device_wall, host_cpu = median(True, "device_wall"), median(True, "host_cpu")
    own = statistics.median(p + h for r in sides[True] for p, h in zip(r["pictures"], r["host_cpu"]))
    at_end = statistics.median(r["at_end"] for r in sides[True])
    grid = SIZE // stride
    print(
        f"{kind} at output stride {stride} ({grid}x{grid} x {args.channels} channels), labeller {args.labeller}: "
        f"epoch without {without:.3f} s, with {with_:.3f} s ({100 * (with_ / without - 1):+.1f}%; target <= 2%); "
        f"less the device work ({device_wall:.3f} s) {with_ - device_wall:.3f} s "
        f"({100 * ((with_ - device_wall) / without - 1):+.1f}%). The callback's own CPU per epoch {own:.2f} CPU-s "
        f"(target <= 0.5): the picture thread {pictures:.2f}, the loop's host work {host_cpu:.3f}; the process "
        f"tree's with minus without {cpu:+.2f} CPU-s, of which the device work {device:.2f} (all threads). The loop "
        f"in the callback's hooks {1000 * blocked:.0f} ms; fit's end {at_end:.2f} s; "
        f"metrics {sides[True][0]['logged']}",
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
    parser.add_argument(
        "--labeller",
        default="projected",
        choices=["projected", "real"],
        help="the box labeller: a wait for its projected GPU time, or the real one on --device",
    )
    parser.add_argument(
        "--finer",
        default="wrong",
        choices=["wrong", "every", "off"],
        help="CAMPanel's Finer-CAM cell: for the birds it gets wrong (default), for every bird, or none",
    )
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
