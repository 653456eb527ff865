"""What ``cubcam evaluate`` writes and prints, on reports made here: Markdown that a class or file name cannot
break, and a terminal summary that fits the terminal."""

from __future__ import annotations

import re

import pytest

from cubcam.train.inspection.evaluate import markdown_table, markdown_text, per_class_table, terminal_table

METHODS = {
    name: {"max_box_acc": 0.7, "box_acc_iou50": 0.9, "heatmap_ratio": 0.6, "pointing_game": 1.0}
    for name in ("gradcam/normalized_mean", "gradcam++/normalized_mean", "layercam/single_point_random", "random")
}


def cells(row: str) -> list[str]:
    """A Markdown table row's cells, split at the pipes that are not escaped."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


@pytest.mark.parametrize("name", ["Red | Blue Warbler", "<b>Bold</b> Tern", "`code` Finch", "Star*ling_"])
def test_a_class_name_stays_one_cell_and_reads_as_itself(name: str) -> None:
    row = {"num_images": 3} | {m: {"max_box_acc": 0.5, "pointing_game": 1.0} for m in METHODS}
    table = per_class_table({name: row, "Plain Finch": row}, list(METHODS)).splitlines()
    header, _, *rows = [line for line in table if line.startswith("|")]
    widths = {len(cells(line)) for line in [header, *rows]}
    assert widths == {len(cells(header))}  # every row as many cells as the header: no pipe split a cell
    (escaped,) = [line for line in rows if "Plain" not in line]
    assert cells(escaped)[0] == markdown_text(name) and "<" not in escaped and "`" not in escaped.replace("\\`", "")


def test_the_terminal_summary_fits_the_terminal_and_names_what_it_leaves_out() -> None:
    for width in (50, 80, 200):
        printed = terminal_table(METHODS, width)
        table, _, rest = printed.partition("(and ")
        assert max(len(line) for line in table.splitlines()) <= width or len(table.splitlines()[0].split()) == 1
        shown = table.splitlines()[0].split()
        assert all(name in shown or name in rest for name in METHODS)
        assert ("see metrics.md" in rest) == (len(shown) < len(METHODS))
    assert "see metrics.md" not in terminal_table(METHODS, 200)  # wide enough: every column
    assert "ROAD" not in markdown_table(METHODS) and "ROAD" not in terminal_table(METHODS, 200)  # not measured
