"""Time one CAM panel per method (GradCAM, GradCAM++, HiResCAM, XGradCAM, LayerCAM): ours against
pytorch-grad-cam's class of the same method, Captum (GradCAM) and a plain forward, in one run; then GradCAM
across architectures (``--archs``: ResNet-50, ConvNeXt-T, ViT-S/16, Swin-T by default), ours against
pytorch-grad-cam on the same layer with the same reshape, and a plain forward.

Layers: ResNet-50 ``layer4``; ConvNeXt ``stages.3``; ViT ``blocks[-1].norm1`` (pytorch-grad-cam's recommended ViT
layer) with the class token dropped and the tokens laid on the 14x14 grid; Swin ``layers.3`` (timm's NHWC stage
output) permuted to NCHW: ``reshape=`` for us, ``reshape_transform=`` for pytorch-grad-cam, the same function.

ResNet-50 (random weights), 16 images at 224 px, CPU, target layer ``layer4``. Each method runs ``--repeats``
times, interleaved so that machine noise hits all of them alike; the median is reported. The baseline "forward"
is a plain eval-mode forward of the same batch under ``torch.no_grad()`` — the physical floor, since our backward
only goes from the score to layer4.

    python bench/cam_speed.py [--repeats 5] [--batch 16] [--size 224] [--arch resnet50] [--methods ...]
                              [--archs resnet50 convnext_tiny vit_small_patch16_224 swin_tiny_patch4_window7_224]

Targets, for every method and architecture: ours <= 0.5x pytorch-grad-cam and <= 1.3x one plain forward.

Then the gradient-free methods (``--free-arch resnet18``, ``--free-batch 2`` images at ``--free-size 64`` px, as
ScoreCAM's K forwards per image would take hours at the sizes above on this CPU): ours against pytorch-grad-cam's
``ScoreCAM`` / ``AblationCAM`` / ``EigenCAM`` on ``layer4``, class targets. Our AblationCAM runs head-only (the
layer's activations from one forward, then the pool and fc per batch of ablated channels), as a CAM module's
explainer does; pytorch-grad-cam's reruns the whole net per batch. ScoreCAM's floor is the ``K * B`` no-grad
forwards of masked images it cannot avoid, in batches of 32, timed in the same run. Targets: AblationCAM and
EigenCAM <= 0.5x pytorch-grad-cam; ScoreCAM <= 1.1x its floor.
"""

from __future__ import annotations

import cubcam.cams  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import argparse
import statistics
import time
from collections.abc import Callable

import pytorch_grad_cam as pgc
import timm
import torch
import torchvision
from captum.attr import LayerGradCam
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cubcam.cams import GradCAM
from cubcam.cams.engine import DEFAULT_CHANNEL_BATCH
from cubcam.train.models import TokenGrid, nhwc_to_nchw

PGC_CLASSES = {
    "gradcam": pgc.GradCAM,
    "gradcam++": pgc.GradCAMPlusPlus,
    "hirescam": pgc.HiResCAM,
    "xgradcam": pgc.XGradCAM,
    "layercam": pgc.LayerCAM,
}
PGC_FREE = {"scorecam": pgc.ScoreCAM, "ablationcam": pgc.AblationCAM, "eigencam": pgc.EigenCAM}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--methods", nargs="+", default=list(PGC_CLASSES), choices=list(PGC_CLASSES))
    parser.add_argument("--archs", nargs="*", default=list(ARCHS), help="the architecture table (none: skip it)")
    parser.add_argument("--free-arch", default="resnet18", help="the gradient-free table's CNN (none: skip it)")
    parser.add_argument("--free-batch", type=int, default=2)
    parser.add_argument("--free-size", type=int, default=64)
    parser.add_argument("--skip-gradients", action="store_true", help="only the gradient-free table")
    args = parser.parse_args()
    if not args.skip_gradients:
        gradient_methods(args)
        if args.archs:
            architectures(args)
    if args.free_arch != "none":
        gradient_free(args)


ARCHS = ("resnet50", "convnext_tiny", "vit_small_patch16_224", "swin_tiny_patch4_window7_224")


def build(
    arch: str, size: int
) -> tuple[torch.nn.Module, torch.nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
    """(model with random weights, its CAM layer, the reshape to NCHW or None)."""
    if arch in ("resnet18", "resnet34", "resnet50"):
        model = getattr(torchvision.models, arch)(num_classes=200).eval()
        return model, model.layer4, None
    extra = {"img_size": size} if arch.startswith(("vit", "deit")) else {}
    model = timm.create_model(arch, pretrained=False, num_classes=200, **extra).eval()
    if hasattr(model, "blocks"):  # a ViT
        return model, model.blocks[-1].norm1, TokenGrid(model.num_prefix_tokens, tuple(model.patch_embed.grid_size))
    if getattr(model, "output_fmt", "NCHW") == "NHWC":  # Swin
        return model, model.layers[-1], nhwc_to_nchw
    return model, model.stages[-1], None


def timed_medians(timed: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    for fn in timed.values():  # warm-up: allocator, thread pools, lazy imports
        fn()
    times: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(repeats):
        for name, fn in timed.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def architectures(args: argparse.Namespace) -> None:
    """GradCAM across architectures: ours and pytorch-grad-cam on the same layer and reshape, and a forward."""
    print(f"\nGradCAM across architectures, {args.batch} images at {args.size} px, median of {args.repeats}")
    print(f"{'arch':<30}{'forward s':>10}{'ours s':>9}{'pgc s':>9}{'ours/fwd':>10}{'ours/pgc':>10}")
    for arch in args.archs:
        torch.manual_seed(0)
        model, layer, reshape = build(arch, args.size)
        images = torch.randn(args.batch, 3, args.size, args.size)
        targets = torch.randint(0, 200, (args.batch,))
        cam = GradCAM(model, layer, reshape=reshape)

        def forward() -> None:
            with torch.no_grad():
                model(images)

        def theirs() -> None:
            with pgc.GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as pgc_cam:
                pgc_cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])
            model.zero_grad(set_to_none=True)

        median = timed_medians({"forward": forward, "ours": lambda: cam(images, targets), "pgc": theirs}, args.repeats)
        fwd, pgc_ratio = median["ours"] / median["forward"], median["ours"] / median["pgc"]
        print(
            f"{arch:<30}{median['forward']:>10.3f}{median['ours']:>9.3f}{median['pgc']:>9.3f}{fwd:>9.2f}x{pgc_ratio:>9.2f}x"
        )


def gradient_methods(args: argparse.Namespace) -> None:
    """Every method on one CNN: ours, pytorch-grad-cam's class of that method, Captum, a forward."""

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)(num_classes=200).eval()
    images = torch.randn(args.batch, 3, args.size, args.size)
    targets = torch.randint(0, 200, (args.batch,))
    captum = LayerGradCam(model, model.layer4)

    def plain_forward() -> None:
        with torch.no_grad():
            model(images)

    def ours(method: str) -> Callable[[], None]:
        cam = GradCAM(model, "layer4", method=method)
        return lambda: cam(images, targets)

    def pytorch_grad_cam(method: str) -> Callable[[], None]:
        def run() -> None:
            with PGC_CLASSES[method](model=model, target_layers=[model.layer4]) as cam:
                cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])
            model.zero_grad(set_to_none=True)

        return run

    def captum_layer_gradcam() -> None:
        attributions = captum.attribute(images, target=targets, relu_attributions=True)
        torch.nn.functional.interpolate(attributions, size=images.shape[-2:], mode="bilinear", align_corners=False)

    timed: dict[str, Callable[[], None]] = {"plain forward (no_grad)": plain_forward}
    for method in args.methods:
        timed[f"cubcam {method}"] = ours(method)
        timed[f"pytorch-grad-cam {method}"] = pytorch_grad_cam(method)
    timed["Captum LayerGradCam"] = captum_layer_gradcam
    median = timed_medians(timed, args.repeats)
    forward = median["plain forward (no_grad)"]
    print(
        f"{args.arch}, {args.batch} images at {args.size} px, CPU threads={torch.get_num_threads()}, "
        f"median of {args.repeats}"
    )
    print(f"{'method':<30}{'s/panel':>10}{'vs forward':>12}")
    for name, seconds in median.items():
        print(f"{name:<30}{seconds:>10.3f}{seconds / forward:>11.2f}x")
    print()
    for method in args.methods:
        ours_s = median[f"cubcam {method}"]
        pgc_ratio, fwd_ratio = ours_s / median[f"pytorch-grad-cam {method}"], ours_s / forward
        print(
            f"{method:<10} ours / pytorch-grad-cam = {pgc_ratio:.2f}x (target <= 0.5x: "
            f"{'OK' if pgc_ratio <= 0.5 else 'MISSED'}), ours / plain forward = {fwd_ratio:.2f}x (target <= 1.3x: "
            f"{'OK' if fwd_ratio <= 1.3 else 'MISSED'})"
        )
    if "gradcam" in args.methods:
        print(
            f"gradcam    ours / Captum LayerGradCam = {median['cubcam gradcam'] / median['Captum LayerGradCam']:.2f}x"
        )


def gradient_free(args: argparse.Namespace) -> None:
    """ScoreCAM, AblationCAM (ours head-only) and EigenCAM: ours, pytorch-grad-cam's, and ScoreCAM's floor."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.free_arch)(num_classes=200).eval()
    images = torch.randn(args.free_batch, 3, args.free_size, args.free_size)
    targets = torch.randint(0, 200, (args.free_batch,))
    trunk = torch.nn.Sequential(*list(model.children())[:-2])  # up to layer4
    head = torch.nn.Sequential(model.avgpool, torch.nn.Flatten(1), model.fc)
    with torch.no_grad():
        channels = trunk(images).shape[1]
    masked = images.repeat_interleave(channels, 0)  # what ScoreCAM must forward: K masked copies of each image

    def floor() -> None:
        with torch.no_grad():
            for start in range(0, len(masked), DEFAULT_CHANNEL_BATCH):
                model(masked[start : start + DEFAULT_CHANNEL_BATCH])

    def ours(method: str) -> Callable[[], None]:
        if method == "ablationcam":  # head-only: one forward to the layer, the head per batch of ablations
            cam = GradCAM(head, None, method="ablationcam")

            def run() -> None:
                with torch.no_grad():
                    activations = trunk(images)
                cam(activations, targets, upsample=True)

            return run
        whole = GradCAM(model, "layer4", method=method)
        return lambda: whole(images, targets)

    def theirs(method: str) -> Callable[[], None]:
        def run() -> None:
            with PGC_FREE[method](model=model, target_layers=[model.layer4]) as cam:
                chosen = None if method == "eigencam" else [ClassifierOutputTarget(int(t)) for t in targets]
                cam(input_tensor=images, targets=chosen)
            model.zero_grad(set_to_none=True)

        return run

    names = tuple(PGC_FREE)
    timed: dict[str, Callable[[], None]] = {"ScoreCAM floor (K*B no-grad forwards)": floor}
    for method in names:
        timed[f"cubcam {method}"] = ours(method)
        timed[f"pytorch-grad-cam {method}"] = theirs(method)
    repeats = max(1, min(args.repeats, 3))  # ScoreCAM's runs are long
    median = timed_medians(timed, repeats)
    print(
        f"\ngradient-free methods: {args.free_arch} (K = {channels} channels at layer4), {args.free_batch} images at "
        f"{args.free_size} px, median of {repeats}"
    )
    print(f"{'method':<40}{'s/panel':>10}")
    for name, seconds in median.items():
        print(f"{name:<40}{seconds:>10.3f}")
    for method in names:
        ratio = median[f"cubcam {method}"] / median[f"pytorch-grad-cam {method}"]
        line = f"{method:<12} ours / pytorch-grad-cam = {ratio:.2f}x"
        if method == "scorecam":
            to_floor = median["cubcam scorecam"] / median["ScoreCAM floor (K*B no-grad forwards)"]
            line += f", ours / floor = {to_floor:.2f}x (target <= 1.1x: {'OK' if to_floor <= 1.1 else 'MISSED'})"
        else:
            line += f" (target <= 0.5x: {'OK' if ratio <= 0.5 else 'MISSED'})"
        print(line)


if __name__ == "__main__":
    main()
