"""report.html beside ``cubcam evaluate`` / ``explain`` and ``cubcam compare``, checked as a person sees them: headless
Chromium opens each page from the disk (no server), no console message, every image in the gallery, the sorting
clicked through (``?selftest`` writes the orders into the page, read back with ``--dump-dom``), a screenshot that is
not blank; compare's numbers against evaluate's; names that are markup stay text."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trained_checkpoints import Trained

from cubcam.train.inspection.compare import main as compare
from cubcam.train.inspection.evaluate import main as evaluate
from cubcam.train.inspection.explain import main as explain
from cubcam.train.inspection.report import Column, Gallery, Page, Section, Sort, Table, write_page

pytestmark = pytest.mark.filterwarnings("ignore:val_fraction is 0:cubcam.CubcamWarning")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium here (Debian's chromium package): the pages are checked in a real browser"
)
COMMON = ["--num-workers", "0", "--batch-size", "8"]


def browse(page: Path, tmp_path: Path) -> tuple[dict, str]:
    """Open ``page?selftest`` headless; (what the self-test wrote into the page, the console's messages)."""
    done = subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
            page.resolve().as_uri() + "?selftest",
        ],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    found = re.search(r'<pre id="selftest">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stdout[-2000:]
    console = "\n".join(line for line in done.stderr.splitlines() if ":CONSOLE" in line)
    return json.loads(html.unescape(found.group(1))), console


def screenshot(page: Path, tmp_path: Path) -> np.ndarray:
    shot = tmp_path / f"{page.parent.name}.png"
    subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
            "--hide-scrollbars", "--window-size=1280,1600", "--virtual-time-budget=5000", f"--screenshot={shot}",
            page.resolve().as_uri(),
        ],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    return np.asarray(Image.open(shot).convert("L"), dtype=float)


def page_data(page: Path) -> dict:
    """The JSON the page holds (what its script draws)."""
    text = page.read_text()
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1))


def parts(data: dict, kind: str) -> list[dict]:
    return [part for section in data["sections"] for part in section["parts"] if part["kind"] == kind]


def expected_order(items: list[dict], key: str, descending: bool) -> list[int]:
    """The page's order: by ``key`` (stable), empty values last either way."""
    present = [item for item in items if item.get(key) is not None]
    missing = [item for item in items if item.get(key) is None]
    return [item["id"] for item in sorted(present, key=lambda item: item[key], reverse=descending) + missing]


@pytest.fixture(scope="module")
def outputs(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("reports")
    evaluate([str(trained.classifier), "--out", str(base / "evaluate"), "--finer", "1", *COMMON])
    explain([str(trained.classifier), "--split", "test", "--num", "5", "--finer", "--out", str(base / "explain"),
             *COMMON])  # fmt: skip
    compare([str(trained.classifier), str(trained.embedding), "--out", str(base / "compare"), *COMMON])
    return {name: base / name for name in ("evaluate", "explain", "compare")}


@needs_browser
def test_the_evaluate_page_shows_every_image_sorts_and_opens_without_errors(outputs, tmp_path) -> None:
    page = outputs["evaluate"] / "report.html"
    report = json.loads((outputs["evaluate"] / "metrics.json").read_text())
    data = page_data(page)
    (gallery,) = parts(data, "gallery")
    assert len(gallery["items"]) == report["num_images"]
    assert all((page.parent / item["src"]).is_file() for item in gallery["items"])
    result, console = browse(page, tmp_path)
    assert console == ""
    (shown,) = result["galleries"]
    assert shown["count"] == report["num_images"] and shown["drawn"] == min(report["num_images"], 300)
    for order, sort in zip(shown["orders"], gallery["sorts"]):  # each button, clicked
        assert order == expected_order(gallery["items"], sort["key"], sort["descending"]), sort["label"]
    scores = next(t for t in result["tables"] if t["title"].startswith("Scores"))
    box_column = 1  # MaxBoxAccV2, ascending then descending
    values = {row["method"]: row["max_box_acc"] for row in parts(data, "table")[0]["rows"]}
    assert scores["orders"][2 * box_column] == sorted(values, key=values.get)
    assert scores["orders"][2 * box_column + 1] == sorted(values, key=values.get, reverse=True)
    assert [row["baseline"] for row in parts(data, "table")[0]["rows"]] == ["", "", "baseline"]  # marked
    assert {p["src"] for p in parts(data, "picture")} >= {"box_accuracy.png", "confused_1.png"}
    assert screenshot(page, tmp_path).std() > 20  # not blank


@needs_browser
def test_the_explain_page_shows_each_image_with_its_finer_map(outputs, tmp_path) -> None:
    page = outputs["explain"] / "report.html"
    summary = json.loads((outputs["explain"] / "summary.json").read_text())
    (gallery,) = parts(page_data(page), "gallery")
    assert [item["srcs"][1] for item in gallery["items"]] == [r["finer"]["overlay"] for r in summary["images"]]
    assert all("cam_box_iou" in r and isinstance(r["peak_in_box"], bool) for r in summary["images"])
    result, console = browse(page, tmp_path)
    assert console == "" and result["galleries"][0]["count"] == len(summary["images"]) == 5


def test_compare_sets_the_scores_evaluate_gives_side_by_side(trained: Trained, outputs) -> None:
    result = json.loads((outputs["compare"] / "metrics.json").read_text())
    evaluated = json.loads((outputs["evaluate"] / "metrics.json").read_text())
    alone = evaluated["methods"]["gradcam"]
    for key in ("max_box_acc", "box_acc_iou50", "heatmap_ratio", "pointing_game"):
        assert result["a"]["scores"][key] == pytest.approx(alone[key], abs=1e-6), key
        assert result["difference"][key] == pytest.approx(
            result["b"]["scores"][key] - result["a"]["scores"][key], abs=2e-6
        )
    assert result["a"]["kind"] == "classifier" and result["b"]["kind"] == "embedding"
    assert len(result["images"]) == result["num_images"] == evaluated["num_images"]
    correlations = [image["rank_correlation"] for image in result["images"]]
    assert all(-1 <= r <= 1 for r in correlations) and result["rank_correlation"] == pytest.approx(
        np.mean(correlations), abs=1e-5
    )
    classes = result["per_class"]
    assert sum(row["images"] for row in classes.values()) == result["num_images"]
    for row in classes.values():
        assert row["change_max_box_acc"] == pytest.approx(row["b_max_box_acc"] - row["a_max_box_acc"], abs=2e-6)


def test_compare_logs_its_scores_and_page_to_wandb(trained: Trained, tmp_path, monkeypatch) -> None:
    from wandb_records import finished_log, history_rows

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = compare([str(trained.classifier), str(trained.embedding), "--out", str(tmp_path), "--limit", "4",
                      "--wandb", "t", *COMMON])  # fmt: skip
    (row,) = history_rows(finished_log(next((tmp_path / "wandb").glob("offline-run-*"))))
    assert row["compare/scores"]["_type"] == "table-file" and row["compare/scores"]["nrows"] == len(
        result["difference"]
    )
    assert row["compare/report"]["_type"] == "html-file"
    html = next((tmp_path / "wandb").glob("offline-run-*/files/" + row["compare/report"]["path"])).read_text()
    assert "Side by side" in html and "report_files/" not in html  # the tables, no gallery (its files stay here)


def test_a_checkpoint_compared_with_itself_changes_nothing(trained: Trained, tmp_path) -> None:
    result = compare([str(trained.classifier), str(trained.classifier), "--out", str(tmp_path), "--limit", "8",
                      *COMMON])  # fmt: skip
    assert all(value == 0 for value in result["difference"].values())
    assert all(image["rank_correlation"] == pytest.approx(1.0) for image in result["images"])


def test_a_run_folder_compares_its_best_and_last_checkpoints(trained: Trained, tmp_path, capsys) -> None:
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(trained.classifier, folder / "best-epoch=1.ckpt")
    shutil.copy(trained.classifier, folder / "last.ckpt")
    result = compare([str(tmp_path / "run"), "--limit", "4", *COMMON])
    assert Path(result["a"]["checkpoint"]).name == "best-epoch=1.ckpt"
    assert Path(result["b"]["checkpoint"]).name == "last.ckpt"
    assert (folder / "best-epoch=1-vs-last-test" / "report.html").is_file()


def test_checkpoints_of_other_classes_are_one_error(trained: Trained, tmp_path, capsys) -> None:
    checkpoint = torch.load(trained.classifier, weights_only=True, map_location="cpu")
    names = checkpoint["hyper_parameters"]["class_names"]
    checkpoint["hyper_parameters"]["class_names"] = ["Dodo", *names[1:]]
    torch.save(checkpoint, tmp_path / "other.ckpt")
    with pytest.raises(SystemExit) as exit_:
        compare([str(trained.classifier), str(tmp_path / "other.ckpt"), "--out", str(tmp_path / "out"), *COMMON])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the checkpoints have different class sets") and "only in A" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


@needs_browser
def test_names_that_are_markup_stay_text_and_a_cub_sized_gallery_opens(tmp_path) -> None:
    """Every name is data the script writes as text; 5,800 images (a CUB test split) in one page of about 1 MB."""
    evil = '</script><script>document.title="owned"</script><b id="evil">x</b>'
    Image.new("RGB", (128, 128), (120, 60, 200)).save(tmp_path / "tile.jpg")
    items = [
        {"id": i, "src": "tile.jpg", "caption": f"{evil if i == 0 else f'bird_{i}.jpg'}\ntrue: class {i % 200}",
         "iou": (i * 7919 % 5800) / 5800, "score": (i * 104729 % 5800) / 5800, "true": f"class {i % 200}",
         "file": f"bird_{i}.jpg"}
        for i in range(5800)
    ]  # fmt: skip
    table = Table("classes", [Column("class", "class", "text"), Column("x", "x")], [{"class": evil, "x": 0.5}])
    sorts = [Sort("iou", "IoU, worst first"), Sort("score", "score", descending=True)]
    page = write_page(
        tmp_path / "report.html",
        Page(evil, [("checkpoint", evil)], [Section(evil, [table, Gallery("all", items, sorts)])]),
    )
    assert "<b id=" not in page.read_text() and page.stat().st_size < 2_000_000
    result, console = browse(page, tmp_path)
    assert console == ""
    (shown,) = result["galleries"]
    assert shown["count"] == 5800 and shown["drawn"] == 300  # drawn a page at a time, sorted over all
    assert shown["orders"][0] == expected_order(items, "iou", False)
    assert result["tables"][0]["orders"][0] == [evil]  # the name, as text
