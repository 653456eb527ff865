"""``cubcam evaluate``'s plots: box accuracy against the CAM threshold, the deletion / insertion curves, and the
sanity check's curves and maps.

Drawn with matplotlib's object API (``Figure``, no pyplot): no global figure state and no GUI backend, so it works
headless and inside other programs. One line per method; the baselines dashed, so the eye finds what "good" is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cubcam.cams.files import write_with

Curves = dict[str, dict[str, list[float]]]  # method -> curve name -> values
BASELINE_STYLED = ("random", "centre_gaussian", "edge")  # the uninformed maps, drawn dashed


def _style(name: str) -> dict[str, object]:
    return {"linestyle": "--", "linewidth": 1.2} if name in BASELINE_STYLED else {"linewidth": 1.8}


def plot_curves(axis: Any, x: Sequence[float], series: dict[str, Sequence[float]], labels: dict[str, str]) -> None:
    """One line per method. A curve equal to one drawn before it (GradCAM, HiResCAM and XGradCAM coincide under a
    global-average-pool head) is labelled ``(= that one)`` and dashed with an offset, so both stay visible."""
    drawn: list[tuple[str, Sequence[float]]] = []
    for name, values in series.items():
        same = next((other for other, seen in drawn if np.allclose(seen, values, atol=1e-9, equal_nan=True)), None)
        style, label = _style(name), labels[name]
        if same is not None:
            label = f"{label} (= {labels[same]})"
            style = {**style, "linestyle": (3 * len(drawn) % 8, (3, 5)), "linewidth": 1.4}
        axis.plot(x, values, label=label, **style)
        drawn.append((name, values))


def box_accuracy_plot(
    curves: Curves, thresholds: Sequence[float], ious: Sequence[float], labels: dict[str, str], path: Path
) -> Path:
    """Box accuracy (%) against the CAM threshold, one panel per IoU threshold, as in Choe et al. (CVPR 2020):
    MaxBoxAccV2 is the mean over panels of each curve's peak."""
    figure = Figure(figsize=(4.2 * len(ious), 3.6), layout="constrained")
    axes = figure.subplots(1, len(ious), sharey=True, squeeze=False)[0]
    for axis, iou in zip(axes, ious):
        key = f"box_acc_iou{round(100 * iou)}"
        plot_curves(axis, thresholds, {name: [100 * v for v in curve[key]] for name, curve in curves.items()}, labels)
        axis.set(title=f"IoU ≥ {iou:.1f}", xlabel="CAM threshold", xlim=(0, 1), ylim=(0, 100))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("box accuracy (%)")
    axes[-1].legend(fontsize=7, loc="upper right")
    return write_with(path, lambda file: figure.savefig(file, format="png", dpi=110))


def faithfulness_plot(curves: Curves, fractions: Sequence[float], labels: dict[str, str], path: Path) -> Path:
    """Deletion (left: the lower the better) and insertion (right: the higher) curves of the mean score."""
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    titles = {"deletion_curve": "deletion (most important first)", "insertion_curve": "insertion onto a blur"}
    for axis, (key, title) in zip(axes, titles.items()):
        plot_curves(axis, [100 * f for f in fractions], {name: curve[key] for name, curve in curves.items()}, labels)
        axis.set(title=title, xlabel="pixels moved (%)", xlim=(0, 100), ylim=(0, 1))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("mean score")
    axes[1].legend(fontsize=7, loc="lower right")
    return write_with(path, lambda file: figure.savefig(file, format="png", dpi=110))


def short_names(names: Sequence[str]) -> list[str]:
    """Block names without the dotted prefix they share (``net.backbone.layer4.1`` -> ``layer4.1``)."""
    parts = [name.split(".") for name in names]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return [".".join(p[shared:]) for p in parts]


def sanity_plot(sanity: dict[str, Any], labels: dict[str, str], path: Path) -> Path:
    """:func:`sanity_figure` written to ``path``."""
    figure = sanity_figure(sanity, labels)
    return write_with(path, lambda file: figure.savefig(file, format="png", dpi=110))


def sanity_figure(sanity: dict[str, Any], labels: dict[str, str]) -> Figure:
    """The sanity check's curves (Adebayo et al.'s figures): the rank correlation (top) and SSIM (bottom) of each
    method's maps with the trained model's, as the blocks are re-initialised cascading from the head (left) and one
    at a time (right); the edge and random baselines dashed, the failing level dotted."""
    titles = {"cascade": "cascading from the head", "independent": "one block at a time"}
    names = short_names(sanity["blocks"])
    lowest = min(
        v for mode in titles for curve in sanity[mode].values() for k in ("spearman", "ssim") for v in curve[k]
    )
    figure = Figure(figsize=(max(9.0, 0.5 * len(names) + 4) + 1.6, 6.4), layout="constrained")
    axes = figure.subplots(2, 2, sharex=True, sharey="row")
    for column, (mode, title) in enumerate(titles.items()):
        for row, (key, ylabel) in enumerate((("spearman", "rank correlation"), ("ssim", "SSIM"))):
            axis = axes[row, column]
            series = {name: curve[key] for name, curve in sanity[mode].items()}
            plot_curves(axis, range(len(names)), series, labels)
            if key == "spearman":
                axis.axhline(sanity["level"], color="grey", linestyle=":", linewidth=1)
            axis.set(ylim=(min(-0.2, lowest - 0.05), 1.05), title=title if row == 0 else None)
            axis.set_ylabel(ylabel if column == 0 else "")
            axis.grid(alpha=0.3)
            axis.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    # outside the axes, right of them (constrained layout makes room): inside, it covered the curves
    figure.legend(*axes[0, 0].get_legend_handles_labels(), fontsize=7, loc="outside right upper")
    return figure


def sanity_maps_figure(
    image: np.ndarray, maps: dict[str, list[np.ndarray]], blocks: Sequence[str], labels: dict[str, str], path: Path
) -> Path:
    """One image (uint8 [H, W, 3], left) and its maps through the cascade: a row per method, the trained model's
    first, then after each block re-initialised (the column names the last one)."""
    columns = ["image", "trained", *(f"…{name}" for name in short_names(blocks))]
    figure = Figure(figsize=(1.1 * len(columns) + 1.5, 1.25 * len(maps) + 0.6), layout="constrained")
    axes = figure.subplots(len(maps), len(columns), squeeze=False)
    for row, (name, series) in enumerate(maps.items()):
        for column, (title, values) in enumerate(zip(columns, [image, *series])):
            axis = axes[row, column]
            axis.imshow(values, cmap="jet", vmin=0, vmax=1) if column else axis.imshow(values)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(title, fontsize=6)
            if column == 0:
                axis.set_ylabel(labels[name], fontsize=6)
    return write_with(path, lambda file: figure.savefig(file, format="png", dpi=100))
