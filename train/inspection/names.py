"""The names of what ``cubcam evaluate`` and ``cubcam compare`` measure, as their tables and pages show them: one
place, so that metrics.md, the terminal and report.html say the same."""

from __future__ import annotations

from typing import cast

from cubcam.cams.methods import METHODS, Method

FINER = "+finer"  # the key suffix of a method's Finer-CAM (--finer): gradcam+finer, gradcam/normalized_mean+finer

BASELINE_NAMES = {
    "random": "random map (baseline)",
    "centre_gaussian": "centre Gaussian (baseline)",
    "edge": "Sobel edges (baseline)",  # the sanity check's
}
METRIC_NAMES = {
    "max_box_acc": "MaxBoxAccV2",
    "box_acc_iou50": "box accuracy @ IoU 0.5",
    "heatmap_ratio": "heatmap ratio (mass in box)",
    "pointing_game": "pointing game (peak in box)",
    "pointing_game_parts": "pointing game (visible parts)",
}
FAITHFULNESS_NAMES = {
    "deletion_auc": "deletion AUC (lower is better)",
    "insertion_auc": "insertion AUC (higher is better)",
    "average_drop": "Average Drop (lower is better)",
    "increase_in_confidence": "Increase in Confidence (higher is better)",
    "road_morf": "ROAD MoRF change (lower is better)",
    "road_lerf": "ROAD LeRF change (higher is better)",
    "road_combined": "ROAD combined (higher is better)",
}

PER_CLASS_KEYS = ("max_box_acc", "box_acc_iou50", "heatmap_ratio", "pointing_game")


def method_name(key: str) -> str:
    """The table's column title of a method key: ``gradcam++`` (a classifier's), ``gradcam++/normalized_mean`` (an
    embedding net's: method / proxy scheme) or a baseline's."""
    if key in BASELINE_NAMES:
        return BASELINE_NAMES[key]
    if key.endswith(FINER):
        return f"Finer-{method_name(key.removesuffix(FINER))}"
    method, _, scheme = key.partition("/")
    title = METHODS[cast(Method, method)].title
    if not scheme:
        return title
    by = "" if method == "gradcam" else f" by {title}"
    return f"EmbeddingCAM{by} ({scheme.replace('_', ' ')} proxy)"
