"""Images/s of ``cubcam evaluate`` against one plain eval forward over the same split, in one run.

For each model kind (a Classifier: GradCAM; an EmbeddingNet: EmbeddingCAM with both proxy schemes) the split is
loaded into memory once, then, interleaved ``--repeats`` times so machine noise hits both alike (median reported):

- forward only: ``module(images)`` per batch under ``torch.inference_mode()`` — the floor;
- evaluate: ``cubcam.train.inspection.evaluate.score_split`` on the same batches — the hooked forward, head-only
  CAMs for every method, upsampling, the MaxBoxAccV2 / heatmap-ratio / pointing-game bookkeeping of every
  method and of the two baselines, and the report gallery's maps (what ``cubcam evaluate`` does per batch, minus
  reading the JPEGs).

Faithfulness (``--faithfulness``) on the same maps: ``cubcam.train.inspection.evaluate.perturb`` (deletion /
insertion curves of ``--steps`` and Average Drop / Increase, for every method and baseline) against its floor, the
same number of batched no-grad forwards of already perturbed batches (what the perturbation costs on top of the
forwards it needs); and the Average Drop step alone against pytorch-grad-cam's ``DropInConfidence`` +
``IncreaseInConfidence`` on the same images and maps (the same quantity: its perturbation is ``x * cam``; it runs
the model once per metric).

ROAD (``--road-images`` of the split, ROAD's default percentiles, the first method's maps): ``cubcam.cams.road.road``
(MoRF and LeRF) against its floor, the sparse solves alone (the systems built beforehand, one per image, mode and
percentile) plus one batched no-grad forward per mode and percentile; and against pytorch-grad-cam's
``ROADCombined`` on the same images, maps and score.

``--simulate`` runs the localization part beside a GPU instead, simulated as ``bench/callback_overhead.py`` does: its
net's forward waits for ResNet-50's A100 forward time (0.13 ms per 224 px image, the CPU idle) and has the real CAM
layer (2,048 channels, 7x7 at output stride 32, 14x14 at 16); 600 validation images of 224 px with boxes, in memory;
``score_split`` (labelling in its own process: labelling processes made it 0.68-0.84x slower here, 2026-12-06) against
the forward alone, for both model kinds.

Then ``cubcam evaluate`` itself runs end to end (JPEG decoding, checkpoint loading, reference cache) once cold
(the embedding net's reference split is embedded and cached) and once warm, beside a plain forward that reads the
same JPEGs through the same DataLoader. Weights are random: speed does not depend on them.

    python bench/evaluate_speed.py [--arch resnet18] [--size 128] [--classes 8] [--per-class 30] [--batch 32]

    python bench/evaluate_speed.py --simulate [--strides 32 16]

Targets: evaluate >= 0.8x the forward-only throughput (>= 0.9x simulated); faithfulness >= 0.8x its forward floor;
ROAD >= 0.8x its floor.
"""

from __future__ import annotations

import cubcam.cams  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch

from cubcam.cams.engine import eval_mode
from cubcam.cams.faithfulness import BLUR_SIGMA, FaithfulnessAccumulator, random_maps
from cubcam.cams.protocol import EvalMethod, HeadExplainer, explain
from cubcam.cams.road import ROAD_PERCENTILES, imputation_system, kept_pixels, road
from cubcam.cams.targets import ExplanationTarget, make_target
from cubcam.train.data.cub import CUBDataset
from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.data.presets import EvalPreset
from cubcam.train.data.synthetic import make_synthetic_cub
from cubcam.train.inspection.checkpoint import load_checkpoint
from cubcam.train.inspection.evaluate import (
    BASELINES,
    EVALUATE_SCHEMES,
    CentreBaseline,
    perturb,
    score_split,
)
from cubcam.train.inspection.evaluate import main as evaluate_main
from cubcam.train.inspection.gallery import GalleryMaps
from cubcam.train.inspection.reference import loader, reference_set
from cubcam.train.modules import Classifier, EmbeddingNet


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
    parser.add_argument(
        "--steps", type=int, default=8, help="faithfulness curve steps (cubcam evaluate's default; 0: skip that part)"
    )
    parser.add_argument("--road-images", type=int, default=16, help="images ROAD is timed on (0: skip it)")
    parser.add_argument("--simulate", action="store_true", help="localization beside a simulated GPU (above)")
    parser.add_argument("--strides", nargs="+", type=int, default=[32, 16], choices=[32, 16], help="with --simulate")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    if args.simulate:
        simulated(args.strides, args.repeats)
        return

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
    faithfulness: dict[str, tuple[int, float, float, float, float]] = {}
    roads: dict[str, tuple[float, float, float]] = {}
    for kind, cls in kinds.items():
        module = cls(
            arch=args.arch, output_stride=args.output_stride, num_classes=data.num_classes, class_names=data.class_names
        )
        ckpt = save_checkpoint(module, data, work / f"{kind}.ckpt")
        module = load_checkpoint(ckpt).module
        targets: dict[str, ExplanationTarget] = {
            "gradcam": make_target("classifier")
        }  # what evaluate scores by default
        if kind == "embedding":
            reference = reference_set(
                module, ckpt, root, split="train", image_size=args.size, batch_size=args.batch, cache=False
            )
            targets = {
                f"gradcam/{scheme}": make_target(
                    "embedding", scheme, reference.embeddings, reference.labels, reference.num_classes
                )
                for scheme in EVALUATE_SCHEMES
            }

        forward_ips, evaluate_ips = (n / t for t in localization_times(module, batches, targets, n, args.repeats))

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
        if args.steps:
            prepared = prepare(module, batches, targets)
            faithfulness[kind] = time_faithfulness(module, prepared, targets, args.steps, args.repeats)
            if args.road_images:
                roads[kind] = time_road(module, prepared, next(iter(targets)), args.road_images, args.repeats)
    if not faithfulness:
        return

    print(
        f"\nfaithfulness, {args.steps} steps, every method and baseline (img/s of the split; median of {args.repeats})"
    )
    print(f"{'model':<11}{'methods':>8}{'floor':>9}{'ours':>9}{'ratio':>8}   Average Drop: ours vs pytorch-grad-cam")
    for kind, (methods, floor, ours, drop, pgc, road_s, road_fw) in faithfulness.items():
        print(
            f"{kind:<11}{methods:>8}{n / floor:>9.1f}{n / ours:>9.1f}{floor / ours:>7.2f}x   "
            f"{n / drop:.1f} vs {n / pgc:.1f} img/s ({pgc / drop:.2f}x faster)"
        )
        print(
            f"{'':<11}with ROAD {n / road_s:.2f} img/s: {road_s / ours:.2f}x the time without it (target <= 1.5x); "
            f"ROAD's forwards alone would make it {(ours + road_fw) / ours:.2f}x"
        )
    if roads:
        print(
            f"\nROAD, percentiles {list(ROAD_PERCENTILES)}, MoRF + LeRF, {args.road_images} images, first method "
            f"(img/s; median of {args.repeats})"
        )
        print(f"{'model':<11}{'floor':>9}{'ours':>9}{'ratio':>8}{'pgc':>9}{'ours/pgc':>10}")
        m = args.road_images
        for kind, (floor, ours, pgc) in roads.items():
            ratio = floor / ours
            print(
                f"{kind:<11}{m / floor:>9.2f}{m / ours:>9.2f}{ratio:>7.2f}x{m / pgc:>9.2f}{ours / pgc:>9.2f}x"
                f"   (target >= 0.8x of the floor: {'OK' if ratio >= 0.8 else 'MISSED'})"
            )


def localization_times(
    module: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    targets: dict[str, ExplanationTarget],
    n: int,
    repeats: int,
) -> tuple[float, float]:
    """(forward-only s, ``score_split`` s) over ``batches``, interleaved ``repeats`` times after a warm-up
    (allocator, thread pools, lazy imports), medians."""

    def forward_only() -> None:
        with torch.inference_mode():
            for batch in batches:
                module(batch["image"])

    def evaluate() -> None:  # with the report's gallery, as cubcam evaluate runs it
        methods: dict[str, EvalMethod] = {name: (target, "gradcam") for name, target in targets.items()}
        score_split(module, batches, methods, torch.device("cpu"), n, progress=False, gallery=GalleryMaps(n))

    forward_only(), evaluate()
    times: dict[str, list[float]] = {"forward": [], "evaluate": []}
    for _ in range(repeats):
        times["forward"].append(timed(forward_only))
        times["evaluate"].append(timed(evaluate))
    return statistics.median(times["forward"]), statistics.median(times["evaluate"])


Prepared = list[tuple[torch.Tensor, torch.Tensor, dict[str, tuple[torch.Tensor, EvalMethod, torch.Tensor]]]]


def prepare(
    module: torch.nn.Module, batches: list[dict[str, torch.Tensor]], targets: dict[str, ExplanationTarget]
) -> Prepared:
    """Per batch: images, outputs, every method's and baseline's maps (as evaluate builds them)."""
    prepared: Prepared = []
    generator = torch.Generator().manual_seed(0)
    explainer = HeadExplainer(module)
    for batch in batches:
        images = batch["image"]
        size = (int(images.shape[-2]), int(images.shape[-1]))
        activations, outputs = explainer.features_and_outputs(images)
        maps = {}
        for name, target in targets.items():
            step = explain(explainer, activations, outputs, target, size, batch["label"])
            maps[name] = (step.maps, (target, "gradcam"), step.rows)
        first = next(iter(maps.values()))
        grid = (int(activations.shape[-2]), int(activations.shape[-1]))
        maps["random"] = (random_maps(len(images), grid, size, generator), *first[1:])
        maps["centre_gaussian"] = (CentreBaseline(size).map.expand(len(images), -1, -1), *first[1:])
        prepared.append((images, outputs, maps))
    return prepared


def time_faithfulness(
    module: torch.nn.Module, prepared: Prepared, targets: dict[str, ExplanationTarget], steps: int, repeats: int
) -> tuple[int, float, float, float, float, float, float]:
    """(methods, floor s, perturb s, our Average Drop s, pytorch-grad-cam's s, perturb with ROAD s, ROAD's forwards
    alone s) over the split, medians."""
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence

    from cubcam.cams.faithfulness import confidence_change

    explainer = HeadExplainer(module)
    methods = len(prepared[0][2])
    forwards = 2 * (steps - 1) + 1  # per method and image; plus the canvas and the one grey image per batch

    def floor() -> None:
        with eval_mode(module), torch.no_grad():
            for images, _, _ in prepared:
                module(images), module(images[:1])
                for _ in range(methods * forwards):
                    module(images)

    def ours() -> None:
        faithful = {name: FaithfulnessAccumulator(steps) for name in [*targets, *BASELINES]}
        for images, outputs, maps in prepared:
            perturb(explainer, images, outputs, maps, faithful, steps, BLUR_SIGMA)

    def with_road() -> None:
        faithful = {name: FaithfulnessAccumulator(steps) for name in [*targets, *BASELINES]}
        noise = torch.Generator().manual_seed(0)
        for images, outputs, maps in prepared:
            perturb(explainer, images, outputs, maps, faithful, steps, BLUR_SIGMA, ROAD_PERCENTILES, noise)

    def road_forwards() -> None:  # what ROAD needs whatever its solver: a forward per map, mode and percentile
        with eval_mode(module), torch.no_grad():
            for images, _, maps in prepared:
                for _ in range(len(maps) * 2 * len(ROAD_PERCENTILES)):
                    module(images)

    first_name = next(iter(targets))

    def our_drop() -> None:
        with eval_mode(module), torch.no_grad():
            for images, outputs, maps in prepared:
                cams, (explained, _), rows = maps[first_name]
                target = explained.target
                confidence_change(
                    lambda x: target.confidence(module(x), rows), images, cams, target.confidence(outputs, rows)
                )

    def pgc_drop() -> None:
        for images, _, maps in prepared:
            cams, (explained, _), rows = maps[first_name]
            target = explained.target
            pgc_targets = [lambda out, r=int(r): target.confidence(out[None], torch.tensor([r]))[0] for r in rows]
            for metric in (DropInConfidence(), IncreaseInConfidence()):
                metric(images, cams.numpy(), pgc_targets, module.eval())

    runs = {"floor": floor, "ours": ours, "drop": our_drop, "pgc": pgc_drop, "road": with_road, "fw": road_forwards}
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    return methods, *(statistics.median(times[k]) for k in runs)


def time_road(
    module: torch.nn.Module, prepared: Prepared, name: str, count: int, repeats: int
) -> tuple[float, float, float]:
    """(floor s, our ROAD s, pytorch-grad-cam's ROADCombined s) on the first ``count`` images, medians."""
    from pytorch_grad_cam.metrics.road import ROADCombined
    from scipy.sparse.linalg import spsolve

    images = torch.cat([p[0] for p in prepared])[:count]
    cams = torch.cat([p[2][name][0] for p in prepared])[:count]
    rows = torch.cat([p[2][name][2] for p in prepared])[:count]
    target = prepared[0][2][name][1][0].target
    percentiles = list(ROAD_PERCENTILES)

    def confidence(x: torch.Tensor) -> torch.Tensor:
        return target.confidence(module(x), rows)

    with eval_mode(module), torch.no_grad():
        base = confidence(images)
    systems = [
        imputation_system(images[b], kept_pixels(order[b], p).numpy())
        for order in (1 - cams, cams)
        for p in percentiles
        for b in range(len(images))
    ]

    def floor() -> None:
        for matrix, right, _ in systems:
            spsolve(matrix, right)
        with eval_mode(module), torch.no_grad():
            for _ in range(2 * len(percentiles)):
                confidence(images)

    def ours() -> None:
        with eval_mode(module), torch.no_grad():
            road(confidence, images, cams, base, torch.Generator().manual_seed(0), percentiles)

    def theirs() -> None:
        pgc_targets = [lambda out, r=int(r): target.confidence(out[None], torch.tensor([r]))[0] for r in rows]
        with torch.random.fork_rng():
            ROADCombined(percentiles)(images, cams.numpy(), pgc_targets, module.eval())

    floor(), ours(), theirs()  # warm-up
    times: dict[str, list[float]] = {"floor": [], "ours": [], "pgc": []}
    for _ in range(repeats):
        for key, fn in (("floor", floor), ("ours", ours), ("pgc", theirs)):
            times[key].append(timed(fn))
    return statistics.median(times["floor"]), statistics.median(times["ours"]), statistics.median(times["pgc"])


def simulated(strides: list[int], repeats: int) -> None:
    """Localization (``score_split``) vs the forward alone, beside a simulated GPU (module doc), medians."""
    sys.path.insert(0, str(Path(__file__).parent))
    from callback_overhead import BATCH, CLASSES, SIZE, VAL, Simulated
    from torch.utils.data import DataLoader

    # The callback benchmark's validation batches; no part locations: the pointing game uses the boxes.
    batches = [{**batch, "parts": torch.zeros(len(batch["image"]), 1, 3)} for batch in DataLoader(VAL, BATCH)]
    n = len(VAL)
    print(
        f"simulated GPU forward, {n} images at {SIZE} px, batch {BATCH}, {torch.get_num_threads()} threads, "
        f"median of {repeats}"
    )
    for stride in strides:
        for kind in ("classifier", "embedding"):
            module = Simulated(stride, 2048, embedding=kind == "embedding").eval()
            targets: dict[str, ExplanationTarget] = {"gradcam": make_target("classifier")}
            if kind == "embedding":
                with torch.inference_mode():
                    embeddings = torch.cat([module(b["image"]) for b in batches])
                labels = torch.cat([b["label"] for b in batches])
                targets = {
                    f"gradcam/{scheme}": make_target("embedding", scheme, embeddings, labels, CLASSES)
                    for scheme in EVALUATE_SCHEMES
                }

            forward, ours = localization_times(module, batches, targets, n, repeats)
            print(
                f"{kind:<11} stride {stride} ({SIZE // stride}x{SIZE // stride}): forward {n / forward:.0f} img/s, "
                f"evaluate {n / ours:.0f} img/s ({len(targets)} method(s) + the centre baseline) = "
                f"{forward / ours:.2f}x (target >= 0.9x)",
                flush=True,
            )


if __name__ == "__main__":
    main()
