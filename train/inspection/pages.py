"""What ``report.html`` shows for each command: :func:`evaluate_page`, :func:`explain_page`, :func:`compare_page`.

The pages are built from the same numbers the commands write to ``metrics.json`` / ``summary.json``; the HTML
itself is ``report.py``'s.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from cubcam.train.inspection.gallery import tile_name
from cubcam.train.inspection.names import (
    BASELINE_NAMES,
    FAITHFULNESS_NAMES,
    METRIC_NAMES,
    PER_CLASS_KEYS,
    method_name,
)
from cubcam.train.inspection.report import FILES, Column, Gallery, Page, Picture, Section, Sort, Table

CAM_THRESHOLD = 0.5  # where explain's CAM boxes are cut (no split to choose a threshold on)
GALLERY_SORTS = [
    Sort("iou", "IoU, worst first"),
    Sort("iou", "IoU, best first", descending=True),
    Sort("score", "score, lowest first"),
    Sort("score", "score, highest first", descending=True),
    Sort("true", "class"),
    Sort("file", "file"),
]


def command_line(argv: list[str] | None, program: str) -> str:
    """The command that made a page, as it would be typed."""
    return " ".join([program, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def metrics_table(methods: dict[str, dict[str, Any]], title: str = "Scores by method (%)") -> Table:
    """Methods as rows (baselines marked), each measured metric a column."""
    names = METRIC_NAMES | FAITHFULNESS_NAMES
    measured = [key for key in names if any(scores.get(key) is not None for scores in methods.values())]
    columns = [Column("method", "method", "text"), *(Column(key, names[key]) for key in measured)]
    rows = [
        {"method": method_name(name), "baseline": "baseline" if name in BASELINE_NAMES else "", **scores}
        for name, scores in methods.items()
    ]
    return Table(title, columns, rows, marked="baseline")


def per_class_rows(per_class: dict[str, dict[str, Any]], method: str) -> list[dict[str, Any]]:
    return [
        {"class": name, "images": row["num_images"], **{key: row[method][key] for key in PER_CLASS_KEYS}}
        for name, row in per_class.items()
    ]


PER_CLASS_COLUMNS = [Column("class", "class", "text"), Column("images", "images", "number")] + [
    Column(key, METRIC_NAMES[key]) for key in PER_CLASS_KEYS
]


def evaluate_page(
    report: dict[str, Any], first: str, threshold: float, plots: list[Path], items: list[dict[str, Any]], command: str
) -> Page:
    """``cubcam evaluate``'s page: the scores, the plots, every image (worst-localized first, by the ``first``
    method's map cut at ``threshold``), per class; the sanity check and Finer-CAM's confused pairs where they ran."""
    facts = [
        ("command", command),
        ("checkpoint", report["checkpoint"]),
        ("split", f"{report['split']} ({report['num_images']} images, {report['image_size']} px)"),
        ("model", report["kind"]),
    ]
    sections = [
        Section(
            "Scores",
            [metrics_table(report["methods"])],
            "Localization against the GT boxes (MaxBoxAccV2: Choe et al., CVPR 2020), faithfulness where measured; "
            "the baselines are uninformed maps scored on the same images. Click a header to sort.",
        ),
        Section("Plots", [Picture(p.stem.replace("_", " "), p.name) for p in plots]),
        Section(
            f"Every image, by {method_name(first)}",
            [
                Gallery(
                    f"{len(items)} images",
                    items,
                    GALLERY_SORTS,
                    f"Each tile: the map, the GT box (green) and the CAM box (red) cut at the threshold where box "
                    f"accuracy at IoU 0.5 is best ({threshold:.2f}); IoU of the two, whether the "
                    f"map's peak lies in the GT box.",
                )
            ],
        ),
        Section(
            "Per class",
            [Table(f"{method_name(first)} (%)", PER_CLASS_COLUMNS, per_class_rows(report["per_class"], first))],
        ),
    ]
    if "sanity" in report:
        sanity = report["sanity"]
        rows = [
            {"method": method_name(name), "after": curve["spearman"][-1], "ssim": curve["ssim"][-1]}
            for name, curve in sanity["cascade"].items()
        ]
        sections.append(
            Section(
                "Sanity check",
                [
                    Table(
                        "After the full cascade",
                        [
                            Column("method", "method", "text"),
                            Column("after", "rank correlation with the trained model's maps", "number"),
                            Column("ssim", "SSIM", "number"),
                        ],
                        rows,
                    )
                ],
                f"Adebayo et al. (NeurIPS 2018): a method whose maps stay above {sanity['level']} rank correlation "
                f"once every block is re-initialised does not explain the trained model.",
            )
        )
    if report.get("confused_pairs"):
        sections.append(
            Section(
                "Finer-CAM: the most confused pairs",
                [
                    Picture(f"{' and '.join(pair['classes'])} ({pair['count']} image(s))", pair["figure"])
                    for pair in report["confused_pairs"]
                ],
            )
        )
    return Page(f"cubcam evaluate: {report['checkpoint']}", facts, sections)


def gallery_item(slot: int, file: str, true: str, predicted: str, score: float, iou: float | None, peak: Any) -> dict:
    """One tile of a gallery: its thumbnail and caption, and the values it sorts by."""
    peak_text = "" if peak is None else f", peak {'in' if peak else 'outside'} the box"
    iou_text = "no GT box" if iou is None else f"IoU {iou:.2f}"
    caption = f"{file}\ntrue: {true}\npred: {predicted} ({score:.2f})\n{iou_text}{peak_text}"
    return {
        "id": slot,
        "src": f"{FILES}/{tile_name(slot)}",
        "caption": caption,
        "file": file,
        "true": true,
        "score": score,
        "iou": iou,
    }


def explain_page(summary: dict[str, Any], command: str) -> Page:
    """``cubcam explain``'s page: every explained image (its overlay with the GT and CAM boxes, its caption), with
    its Finer-CAM overlay beside it where there is one; the grids; the images that could not be read."""
    records = summary["images"]
    items = []
    for slot, record in enumerate(records):
        true = record["true"]["name"] if record.get("true") else ""
        file = Path(record.get("path") or record["source"]).name
        item = gallery_item(
            slot, file, true or "(no label)", record["predicted"]["name"], record["predicted"]["score"],
            record.get("cam_box_iou"), record.get("peak_in_box"),
        )  # fmt: skip
        item["caption"] += f"\nmap: {record['target']['name']} ({record['target']['kind']})"
        if record.get("finer", {}).get("overlay"):
            item["srcs"] = [item["src"], record["finer"]["overlay"]]
            item["caption"] += f"\nright: Finer-CAM against {record['finer']['rivals'][0]['name']}"
        items.append(item)
    facts = [
        ("command", command),
        ("checkpoint", str(summary["checkpoint"])),
        ("method", f"{summary['method']} ({summary['kind']}, the {summary['target']} class)"),
    ]
    sections = [
        Section(
            "Every image",
            [
                Gallery(
                    f"{len(items)} images",
                    items,
                    GALLERY_SORTS,
                    f"GT box green (dataset images), the CAM box red, cut at {CAM_THRESHOLD}; IoU of the two and "
                    f"whether the map's peak lies in the GT box.",
                )
            ],
        ),
        Section("Grids", [Picture(name, name) for name in summary.get("grids", [])]),
    ]
    if summary.get("errors"):
        rows = [{"source": e["source"], "error": e["error"]} for e in summary["errors"]]
        columns = [Column("source", "image", "text"), Column("error", "why it was skipped", "text")]
        sections.append(Section("Images that could not be read", [Table("", columns, rows)]))
    return Page(f"cubcam explain: {Path(str(summary['checkpoint'])).name}", facts, sections)


def retrieval_page(summary: dict[str, Any], command: str) -> Page:
    """``cubcam explain --query``'s page: the figure and the neighbours."""
    columns = [
        Column("rank", "rank", "number"),
        Column("name", "class", "text"),
        Column("similarity", "cosine", "number"),
        Column("file", "file", "text"),
    ]
    rows = [{**n, "file": Path(n["path"]).name} for n in summary["neighbours"]]
    parts: list[Table | Picture | Gallery] = [Table("Nearest neighbours", columns, rows), Picture("", summary["grid"])]
    if summary.get("finer", {}).get("overlay"):
        parts.append(Picture("Finer-CAM of the query", summary["finer"]["overlay"]))
    facts = [("command", command), ("checkpoint", str(summary["checkpoint"])), ("query", str(summary["query"]))]
    return Page(f"cubcam explain --query: {Path(str(summary['query'])).name}", facts, [Section("Retrieval", parts)])


def compare_page(result: dict[str, Any], items: list[dict[str, Any]], command: str) -> Page:
    """``cubcam compare``'s page: the two checkpoints' scores side by side with B minus A, per class the change in
    MaxBoxAccV2 and accuracy (the largest loss first), and every image's two maps, the most changed first."""
    names = METRIC_NAMES | {"accuracy": "accuracy (top-1)"}
    rows = [
        {
            "metric": names[key],
            "a": result["a"]["scores"][key],
            "b": result["b"]["scores"][key],
            "change": result["difference"][key],
        }
        for key in result["difference"]
    ]
    side_by_side = Table(
        "Scores (%)",
        [
            Column("metric", "metric", "text"),
            Column("a", "A"),
            Column("b", "B"),
            Column("change", "B \u2212 A", "delta"),
        ],
        rows,
        "Localization of each checkpoint's own maps (GradCAM of the true class, or EmbeddingCAM against its own "
        "Normalized Mean Proxies) against the GT boxes, and its accuracy, on the same images.",
    )
    classes = sorted(result["per_class"].items(), key=lambda item: (item[1]["change_max_box_acc"], item[0]))
    class_rows = [{"class": name, **row} for name, row in classes]
    class_columns = [
        Column("class", "class", "text"),
        Column("images", "images", "number"),
        Column("a_max_box_acc", "A MaxBoxAccV2"),
        Column("b_max_box_acc", "B MaxBoxAccV2"),
        Column("change_max_box_acc", "MaxBoxAccV2 change", "delta"),
        Column("a_accuracy", "A accuracy"),
        Column("b_accuracy", "B accuracy"),
        Column("change_accuracy", "accuracy change", "delta"),
        Column("rank_correlation", "mean rank correlation of the maps", "number"),
    ]
    sorts = [
        Sort("rank_correlation", "most changed first"),
        Sort("iou_change", "IoU lost most first"),
        Sort("iou_change", "IoU gained most first", descending=True),
        Sort("true", "class"),
        Sort("file", "file"),
    ]
    facts = [
        ("command", command),
        ("A", f"{result['a']['checkpoint']} ({result['a']['kind']})"),
        ("B", f"{result['b']['checkpoint']} ({result['b']['kind']})"),
        ("split", f"{result['split']} ({result['num_images']} images, {result['image_size']} px)"),
        ("maps alike", f"mean rank correlation {result['rank_correlation']:.2f}"),
    ]
    sections = [
        Section("Side by side", [side_by_side]),
        Section("Per class", [Table("The largest loss of MaxBoxAccV2 first (%)", class_columns, class_rows)]),
        Section(
            "Where the maps changed",
            [
                Gallery(
                    f"{len(items)} images: A left, B right",
                    items,
                    sorts,
                    "Each image's map by A and by B (GT box green; each checkpoint's CAM box red, at its own best "
                    "threshold), the Spearman rank correlation of the two maps' pixels (1: the same ranking), and the "
                    "change of the CAM box's IoU.",
                )
            ],
        ),
    ]
    return Page("cubcam compare", facts, sections)
