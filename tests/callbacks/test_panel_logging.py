"""What a run with CAMPanel logs, read back from W&B's offline transaction log (and the other loggers' files):
one panel per epoch with boxes, captions and metrics, the same birds after a resume, failures as warnings."""

from __future__ import annotations

import cubcam.cams  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import errno
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from panel_runs import (
    LAYER,
    SIZE,
    TILE,
    campanel_warnings,
    data_for,
    finished_run,
    module_for,
    panel_indices,
    panel_rows,
    trainer_for,
    wandb_logger,
)
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from wandb_records import finished_log, history_rows, read_records

from cubcam.callbacks import CAMPanel, CAMPanelWarning
from cubcam.callbacks.epoch_maps import METRIC_KEYS
from cubcam.callbacks.panel_select import spread_over_classes
from cubcam.callbacks.sinks import EVOLUTION_GIF_KEY, EVOLUTION_KEY, PANEL_KEY, TABLE_COLUMNS, TABLE_KEY
from cubcam.cams.figure import GAP

# These tests validate on the test split on purpose (val_fraction=0: every image of a tiny CUB counts).
pytestmark = pytest.mark.filterwarnings("ignore:val_fraction is 0:cubcam.CubcamWarning")


@pytest.mark.parametrize(
    "kind, proxy",
    [("classifier", "normalized_mean"), ("embedding", "normalized_mean"), ("embedding", "single_point_nearest")],
)
def test_one_panel_per_epoch_with_boxes_captions_and_metrics(synthetic_cub, offline, kind, proxy):
    epochs, num = 2, 6
    data = data_for(synthetic_cub, kind)
    logger = wandb_logger(offline)
    panel = CAMPanel(num_images=num, proxy=proxy, finer="off")  # two cells a bird (test_panel_finer: the third)
    trainer = trainer_for(offline, epochs, [panel], logger=logger, num_sanity_val_steps=1)  # sanity check: no panel
    pl.seed_everything(0, verbose=False)  # the initial weights: an untrained net's map may be flat (no CAM box)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module_for(kind, data), datamodule=data)
    assert campanel_warnings(caught) == []
    run_dir = finished_run(logger)
    rows = history_rows(finished_log(run_dir))
    dataset = data.val_dataset

    panels = [row for row in rows if PANEL_KEY in row]
    assert len(panels) == epochs
    labels = [dataset.labels[i] for i in panel.panel]
    assert len(set(labels)) == min(num, len(dataset.class_names))  # spread over every class of this tiny set
    steps_per_epoch = trainer.global_step // epochs
    strip = 2 * TILE + GAP  # a bird's two cells
    primary_cam_boxes = 0
    for epoch, row in enumerate(panels):
        media = row[PANEL_KEY]
        assert media["_type"] == "image-file" and media["caption"].startswith(f"epoch {epoch}: ")
        # The CAM metrics are in Lightning's own row of the epoch's val/* metrics; the panel is at that step.
        metrics = [r for r in rows if r.get("epoch") == epoch and "val/cam_max_box_acc" in r]
        assert len(metrics) == 1 and any(key.startswith("val/") and "cam" not in key for key in metrics[0])
        assert row["epoch"] == epoch
        assert row["trainer/global_step"] == metrics[0]["trainer/global_step"] == (epoch + 1) * steps_per_epoch - 1
        assert panel_indices(row) == panel.panel
        pixels = np.asarray(Image.open(run_dir / "files" / media["path"]).convert("RGB"))
        assert pixels.shape == (media["height"], media["width"], 3) and pixels.std() > 10  # decodes, not blank
        assert media["width"] == 4 + 4 * (strip + 4)  # four strips a row
        groups = {
            key: json.loads((run_dir / "files" / group["path"]).read_text()) for key, group in media["boxes"].items()
        }
        assert set(groups) == {"ground_truth", "cam"}
        gts = groups["ground_truth"]["box_data"]
        assert len(gts) == 2 * num  # each bird's box in both of its cells
        tops: dict[int, set[int]] = {}
        for k, index in enumerate(panel.panel):  # the first cell's GT box, moved to the bird's place in the grid
            gt = gts[2 * k]
            x, y, w, h = (TILE / SIZE * dataset[index]["box"]).tolist()  # in the enlarged cell's pixels
            left = 4 + (k % 4) * (strip + 4)
            assert gt["class_id"] == dataset.labels[index] and gt["domain"] == "pixel"
            assert gt["position"]["minX"] == round(left + x) and gt["position"]["maxX"] == round(left + x + w)
            assert gt["position"]["maxY"] - gt["position"]["minY"] in (round(h) - 1, round(h), round(h) + 1)
            tops.setdefault(k // 4, set()).add(gt["position"]["minY"] - round(y))
        assert tops[0] == {4} and all(len(top) == 1 for top in tops.values())  # one row of strips, one top
        assert (
            groups["ground_truth"]["class_labels"][str(gts[0]["class_id"])] == dataset.class_names[gts[0]["class_id"]]
        )
        for box in groups["cam"]["box_data"]:  # each CAM box lies inside the cell of its map
            position = box["position"]
            k = (position["minX"] - 4) // (strip + 4)
            offset = position["minX"] - 4 - k * (strip + 4)
            left = 4 + k * (strip + 4) + (0 if offset < TILE else TILE + GAP)
            assert left <= position["minX"] < position["maxX"] <= left + TILE
            primary_cam_boxes += offset < TILE
    # A barely trained net's GradCAM is often flat (the ReLU of a negative sum: no box); seeded, several of the
    # primary maps have one.
    assert primary_cam_boxes >= epochs

    metric_rows = [row for row in rows if all(key in row for key in METRIC_KEYS)]
    assert [row["epoch"] for row in metric_rows] == list(range(epochs))
    for row in metric_rows:
        assert all(0 <= row[key] <= 1 for key in METRIC_KEYS), row

    folder = offline / "cubcam" / logger.version / "cam_panels"  # beside checkpoints/
    pngs = sorted(folder.glob("epoch_*.png"))
    assert [p.name for p in pngs] == [f"epoch_{e:03d}.png" for e in range(epochs)]
    grid = np.asarray(Image.open(pngs[-1]).convert("RGB"))
    assert grid.shape[1] > 4 * (2 * SIZE + GAP) and grid.std() > 10
    assert_tables_metrics_and_evolution(run_dir, rows, panel, dataset, epochs, folder)


def assert_tables_metrics_and_evolution(
    run_dir: Path, rows: list[dict], panel: CAMPanel, dataset, epochs: int, folder: Path
) -> None:
    """val/cam_table: one incremental table of numbers, each panel epoch's rows an increment, the CAM scores defined
    with summary max, and the evolution (image list and GIF) once at the end, also as files."""
    num = len(panel.panel)
    panels = [row for row in rows if PANEL_KEY in row]
    for epoch, row in enumerate(panels):
        table = row[TABLE_KEY]
        assert table["_type"] == "incremental-table-file" and table["increment_num"] == epoch
        assert (table["nrows"], table["ncols"]) == (num * (epoch + 1), len(TABLE_COLUMNS))  # the table so far
        content = json.loads((run_dir / "files" / table["path"]).read_text())
        assert content["columns"] == TABLE_COLUMNS
        columns = {name: [r[k] for r in content["data"]] for k, name in enumerate(TABLE_COLUMNS)}
        assert columns["index"] == panel.panel and columns["epoch"] == [epoch] * num
        assert columns["true"] == [dataset.class_names[dataset.labels[i]] for i in panel.panel]
        assert all(0 <= v <= 1 for key in ("score", "cam_box_iou", "heatmap_ratio") for v in columns[key])
        assert all(isinstance(v, bool) for v in columns["peak_in_box"])
        assert columns["finer_heatmap_ratio"] == columns["finer_peak_in_box"] == [None] * len(columns["index"])
    records = list(read_records(finished_log(run_dir)))
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    tables = [a for a in artifacts if a.type == "wandb-run-incremental-table" and "valcam_table" in a.name]
    assert len(tables) == epochs and len({a.name for a in tables}) == 1  # one table, an increment per epoch
    for artifact in tables:  # numbers only: no image for W&B to copy on the loop's thread
        assert not [entry for entry in artifact.manifest.contents if entry.path.endswith(".png")]
    defined = {r.metric.name: r.metric for r in records if r.WhichOneof("record_type") == "metric"}
    for key in METRIC_KEYS:
        assert defined[key].summary.max and defined[key].step_metric == "trainer/global_step", key

    (evolution,) = [row for row in rows if EVOLUTION_KEY in row]
    assert evolution[EVOLUTION_KEY]["count"] == num and evolution[EVOLUTION_KEY]["captions"] == [
        f"#{i}" for i in panel.panel
    ]
    for filename in evolution[EVOLUTION_KEY]["filenames"]:
        strip = np.asarray(Image.open(run_dir / "files" / filename).convert("RGB"))
        assert strip.shape[1] >= epochs * SIZE and strip.std() > 10  # one thumbnail per epoch, left to right
    gif = Image.open(run_dir / "files" / evolution[EVOLUTION_GIF_KEY]["path"])
    assert evolution[EVOLUTION_GIF_KEY]["format"] == "gif" and gif.n_frames == epochs
    assert sorted(p.name for p in folder.glob("evolution*")) == sorted(
        ["evolution.gif", *(f"evolution_{i}.png" for i in panel.panel)]
    )


def test_panel_files_reach_wandb_also_where_it_may_symlink_media(synthetic_cub, offline):
    """The grid goes to W&B as a JPEG file from a temporary folder, removed once logged; a run that may symlink media
    gets the array instead (a symlink into the removed folder would dangle). Both runs' images hold the same
    pixels, and no temporary folder is left."""
    import wandb

    data = data_for(synthetic_cub, "classifier")
    pixels = {}
    for symlink in (False, True):
        logger = wandb_logger(offline / str(symlink), settings=wandb.Settings(allow_media_symlink=symlink))
        pl.seed_everything(0, verbose=False)
        trainer_for(offline, 1, [CAMPanel(num_images=4)], logger=logger).validate(
            module_for("classifier", data), datamodule=data, verbose=False
        )
        run_dir = finished_run(logger)
        (row,) = panel_rows(run_dir)
        path = run_dir / "files" / row[PANEL_KEY]["path"]
        assert path.is_file() and not path.is_symlink()
        pixels[symlink] = np.asarray(Image.open(path).convert("RGB"))
    # The same grid: a JPEG of it, or the array W&B encodes as PNG itself.
    assert pixels[False].shape == pixels[True].shape and pixels[False].std() > 10
    assert np.abs(pixels[False].astype(int) - pixels[True].astype(int)).mean() < 2.5  # JPEG at quality 90
    assert not list(Path(tempfile.gettempdir()).glob("cubcam-panel-*"))


def test_resumed_run_shows_the_same_birds(synthetic_cub, offline):
    data = data_for(synthetic_cub, "classifier")
    first_logger = wandb_logger(offline / "first")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=offline / "ckpt", save_last=True)
    first = trainer_for(
        offline, 1, [CAMPanel(num_images=4, seed=0), ckpt], logger=first_logger, enable_checkpointing=True
    )
    first.fit(module_for("classifier", data), datamodule=data)
    before = panel_indices(panel_rows(finished_run(first_logger))[0])

    # Another seed would choose other birds; the resumed run keeps the ones in the checkpoint.
    assert spread_over_classes(data.val_dataset.labels, 4, torch.Generator().manual_seed(7)) != before
    resumed_logger = wandb_logger(offline / "resumed")
    resumed = trainer_for(offline, 2, [CAMPanel(num_images=4, seed=7)], logger=resumed_logger)
    resumed.fit(module_for("classifier", data), datamodule=data, ckpt_path=offline / "ckpt" / "last.ckpt")
    run_dir = finished_run(resumed_logger)
    rows = panel_rows(run_dir)
    assert len(rows) == 1 and rows[0][PANEL_KEY]["caption"].startswith("epoch 1:")
    assert panel_indices(rows[0]) == before
    # The evolution comes from the checkpoint too: epoch 0 (first run) and epoch 1 (resumed), once each.
    (evolution,) = [row for row in history_rows(finished_log(run_dir)) if EVOLUTION_GIF_KEY in row]
    gif = Image.open(run_dir / "files" / evolution[EVOLUTION_GIF_KEY]["path"])
    assert gif.n_frames == 2
    frames = []
    for k in range(gif.n_frames):
        gif.seek(k)
        frames.append(np.asarray(gif.convert("RGB")).astype(int))
    assert np.abs(frames[0] - frames[1]).mean() > 1  # two different epochs, not one frame twice
    # The one W&B table across epochs: offline each increment is a file of its epoch's rows; both runs' together
    # hold every epoch's birds once.
    increments = [
        json.loads(path.read_text())
        for run in (finished_run(first_logger), run_dir)
        for path in run.glob("files/media/table/val/cam_table_*.table.json")
    ]
    epoch_column = TABLE_COLUMNS.index("epoch")
    assert sorted(row[epoch_column] for table in increments for row in table["data"]) == [0] * 4 + [1] * 4


class FailingWandbLogger(WandbLogger):
    """W&B that fails on media (a broken upload, a full disk)."""

    def log_metrics(self, metrics, step=None):
        if PANEL_KEY in metrics:
            raise OSError("No space left on device")
        super().log_metrics(metrics, step)


MKSTEMP = tempfile.mkstemp


def read_only_run_dir(*args, dir=None, **kwargs):
    """The run's folder is read-only (the W&B strips, written to a temporary folder, still get through)."""
    if "cam_panels" in str(dir):
        raise PermissionError(errno.EROFS, "read-only file system")
    return MKSTEMP(*args, dir=dir, **kwargs)


@pytest.mark.parametrize("layer", [None, LAYER])
def test_logging_and_writing_failures_only_warn(synthetic_cub, offline, monkeypatch, layer):
    data = data_for(synthetic_cub, "classifier")
    monkeypatch.setattr(tempfile, "mkstemp", read_only_run_dir)  # cubcam.cams.files writes through it
    logger = FailingWandbLogger(project="cubcam", save_dir=str(offline), offline=True)
    with pytest.warns(CAMPanelWarning) as caught:
        trainer_for(offline, 1, [CAMPanel(num_images=4, target_layer=layer)], logger=logger).validate(
            module_for("classifier", data), datamodule=data, verbose=False
        )
    rows = history_rows(finished_log(finished_run(logger)))
    messages = campanel_warnings(caught)
    assert any("FailingWandbLogger" in m and "No space left on device" in m for m in messages), messages
    assert any("PNG grid in" in m and "cam_panels" in m and "read-only" in m for m in messages), messages
    # Validation finished and the metrics reached W&B, at the epoch's step, with the epoch.
    (scores,) = [row for row in rows if "val/cam_max_box_acc" in row]
    assert all(key in scores for key in METRIC_KEYS) and scores["epoch"] == 0


def test_other_loggers_get_the_png_in_their_log_dir(synthetic_cub, tmp_path):
    data = data_for(synthetic_cub, "classifier")
    logger = CSVLogger(tmp_path, name="csv")
    with pytest.warns(CAMPanelWarning, match="CSVLogger cannot show the panels.*go to .*cam_panels as PNG files"):
        trainer_for(tmp_path, 1, [CAMPanel(num_images=4)], logger=logger).validate(
            module_for("classifier", data), datamodule=data, verbose=False
        )
    png = Path(logger.log_dir) / "cam_panels" / "epoch_000.png"
    assert png.is_file() and np.asarray(Image.open(png)).std() > 10


def test_several_loggers_each_get_the_panel_in_their_own_api(synthetic_cub, offline):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = data_for(synthetic_cub, "classifier")
    wandb_log, tensorboard = wandb_logger(offline), TensorBoardLogger(offline, name="tb")
    trainer_for(offline, 1, [CAMPanel(num_images=4)], logger=[wandb_log, tensorboard]).fit(
        module_for("classifier", data), datamodule=data
    )
    rows = [row for row in history_rows(finished_log(finished_run(wandb_log))) if PANEL_KEY in row]
    assert len(rows) == 1 and len(panel_indices(rows[0])) == 4 and rows[0][TABLE_KEY]["nrows"] == 4
    events = EventAccumulator(tensorboard.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images(PANEL_KEY)) == 1 and len(events.Images(EVOLUTION_KEY)) == 1
    assert events.Images(PANEL_KEY)[0].step == rows[0]["trainer/global_step"]


def test_wandb_records_reader_reassembles_records_across_blocks(offline):
    import wandb

    run = wandb.init(project="reader", dir=str(offline), mode="offline")
    logged = [{"i": i, "text": "bird" * (i * 2999 % 20000)} for i in range(30)]  # rows up to 80 KB: 3 blocks
    for row in logged:
        run.log(row)
    run_dir = Path(run.dir).parent
    run.finish()
    rows = history_rows(finished_log(run_dir))
    assert [{key: row[key] for key in ("i", "text")} for row in rows] == logged
    assert max(len(row["text"]) for row in rows) > 2 * 32 * 1024


def test_fast_dev_run_writes_no_panel_files(synthetic_cub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = data_for(synthetic_cub, "classifier")
    pl.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[CAMPanel(num_images=4)],
    ).fit(module_for("classifier", data), datamodule=data)
    assert not list(tmp_path.rglob("*.png"))  # Lightning's dry run writes no files; nor do the panels


def test_panels_and_metrics_are_logged_at_their_epoch_s_step_in_epoch_order(synthetic_cub, offline):
    """W&B: each epoch's CAM metrics in Lightning's row of its val/* metrics, and its panel at that step with the
    epoch, once and in epoch order, though the panel is logged after the next epoch has started."""
    data = data_for(synthetic_cub, "classifier")
    logger = wandb_logger(offline)
    trainer_for(offline, 3, [CAMPanel(num_images=4)], logger=logger, limit_train_batches=2).fit(
        module_for("classifier", data), datamodule=data
    )
    rows = history_rows(finished_log(finished_run(logger)))
    val_rows = [row for row in rows if "val/acc" in row]
    panels = [row for row in rows if PANEL_KEY in row]
    assert [row["epoch"] for row in val_rows] == [0, 1, 2] == [row["epoch"] for row in panels]
    assert all(key in row for row in val_rows for key in METRIC_KEYS)
    assert [row["trainer/global_step"] for row in panels] == [row["trainer/global_step"] for row in val_rows]
