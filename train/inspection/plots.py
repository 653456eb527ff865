"""``cubcam evaluate``'s plots: box accuracy against the CAM threshold, and the deletion / insertion curves.

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


def _style(name: str) -> dict[str, object]:
    return {"linestyle": "--", "linewidth": 1.2} if name in ("random", "centre_gaussian") else {"linewidth": 1.8}


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
