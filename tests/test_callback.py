"""CAMPanel with the real modules on a tiny synthetic CUB, read back from W&B's offline transaction log: one panel per
epoch (also under DDP), the metrics every epoch, the same birds after a resume, bit-identical training, warnings
instead of errors, and maps that find the birds better than a centred blob.

Run as a script (``python tests/test_callback.py ddp OUT ROOT``) it is the DDP training the DDP test launches:
Lightning re-runs this same command line for rank 1.
"""

from __future__ import annotations

import cubcam.cams  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import errno
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from cubcam.callbacks import CAMPanel, CAMPanelWarning, cam_panel, measure
from cubcam.callbacks.cam_panel import LEDGER
from cubcam.callbacks.deferred import WORKER_NAME
from cubcam.callbacks.measure import METRIC_KEYS
from cubcam.callbacks.panel_select import random_subset, spread_over_classes
from cubcam.callbacks.sinks import EVOLUTION_GIF_KEY, EVOLUTION_KEY, PANEL_KEY, TABLE_COLUMNS, TABLE_KEY
from cubcam.cams import GradCAM, localization
from cubcam.cams.figure import GAP
from cubcam.cams.protocol import head_cams
from cubcam.cams.targets import ClassLogits
from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.data.synthetic import make_synthetic_cub
from cubcam.train.modules import Classifier, EmbeddingNet

sys.path.insert(0, str(Path(__file__).parent))
from wandb_records import finished_log, history_rows, read_records

SIZE = 64  # image_size: 4x4 CAMs at output stride 16
LAYER = "net.backbone.layer4"  # the target_layer path, on cubcam's own module (treated as one without the protocol)


def data_for(root: Path, kind: str, **kwargs) -> CUBDataModule:
    """The tests' data: validation on the test split (``val_fraction=0``), so panels and metrics see the whole
    split these tests count on (the held-out split itself is tested in test_data.py and test_train.py)."""
    sampler = {"sampler": "m_per_class", "m_per_class": 4} if kind == "embedding" else {}
    kwargs = {"val_fraction": 0.0, **kwargs}
    return CUBDataModule(root=str(root), image_size=SIZE, batch_size=8, num_workers=0, **sampler, **kwargs)


def module_for(kind: str, data: CUBDataModule, **kwargs) -> pl.LightningModule:
    common = dict(arch="resnet18", output_stride=16, num_classes=data.num_classes, class_names=data.class_names)
    kwargs = {"lr": 2e-3, **kwargs}
    if kind == "classifier":
        return Classifier(**common, **kwargs)
    return EmbeddingNet(**common, embedding_dim=32, **kwargs)


def trainer_for(work: Path, epochs: int, callbacks: list[pl.Callback], logger=False, **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        default_root_dir=str(work),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    return pl.Trainer(**{**options, **kwargs}, callbacks=callbacks)


def wandb_logger(work: Path, **kwargs) -> WandbLogger:
    return WandbLogger(project="cubcam", save_dir=str(work), offline=True, **kwargs)


def finished_run(logger: WandbLogger) -> Path:
    """Flush the run; its folder (``.../wandb/offline-run-<time>-<id>``)."""
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    return run_dir


def panel_rows(run_dir: Path) -> list[dict]:
    return [row for row in history_rows(finished_log(run_dir)) if PANEL_KEY in row]


def panel_indices(row: dict) -> list[int]:
    return [int(re.match(r"#(\d+),", caption).group(1)) for caption in row[PANEL_KEY]["captions"]]


def campanel_warnings(records: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in records if issubclass(w.category, CAMPanelWarning)]


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return tmp_path


# --- choosing the panel ------------------------------------------------------------------------------------------


def test_panel_spreads_over_classes_deterministically_without_the_global_rng():
    labels = [0] * 10 + [1] * 3 + [2] * 1 + [3] * 2
    state = torch.get_rng_state()
    chosen = spread_over_classes(labels, 6, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert len(set(chosen)) == 6 and {labels[i] for i in chosen} == {0, 1, 2, 3}
    assert chosen == spread_over_classes(labels, 6, torch.Generator().manual_seed(0))
    assert len({labels[i] for i in chosen[:4]}) == 4  # round robin: one image of every class before a second one
    others = {tuple(spread_over_classes(labels, 6, torch.Generator().manual_seed(s))) for s in range(1, 6)}
    assert len(others - {tuple(chosen)}) >= 1  # the seed matters
    assert len(spread_over_classes(labels, 100, torch.Generator())) == len(labels)
    subset = random_subset(10, 4, torch.Generator().manual_seed(0))
    assert subset == sorted(set(subset)) and len(subset) == 4 and max(subset) < 10
    assert random_subset(5, 512, torch.Generator()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_images": 0}, "num_images"),
        ({"every_n_epochs": 1.5}, "every_n_epochs"),
        ({"method": "lime"}, "method"),
        ({"proxy": "mean"}, "proxy"),
        ({"target": "both"}, "target"),
        ({"alpha": 2}, "alpha"),
        ({"colormap": "viridis"}, "colormap"),
        ({"metrics_subset": 0}, "metrics_subset"),
        ({"weighting": "bogus"}, "weighting"),
        ({"weighting": "scorecam"}, "'scorecam' needs a forward of the whole model per channel and image"),
        ({"weighting": "ablationcam", "target_layer": "net.layer4"}, "'ablationcam' with target_layer needs"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CAMPanel(**kwargs)


def test_the_weighting_reaches_the_metrics(synthetic_cub, tmp_path):
    """CAMPanel(weighting=...) scores the maps of that weighting: val/cam_heatmap_ratio equals the ratio of the
    head-only maps computed here with it, and differs between weightings."""
    from cubcam.cams.localization import heatmap_ratio

    data = data_for(synthetic_cub, "classifier")
    module = module_for("classifier", data)
    data.setup("validate")
    items = [data.val_dataset[i] for i in range(len(data.val_dataset))]
    images, labels = torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])
    boxes = torch.stack([it["box"] for it in items])
    logged = {}
    # (HiResCAM equals GradCAM under a pooled linear head); the gradient-free ones the loop can afford
    for weighting in ("gradcam", "layercam", "ablationcam", "eigencam"):
        panel = CAMPanel(num_images=2, weighting=weighting)
        trainer_for(tmp_path, 1, [panel]).validate(module, datamodule=data, verbose=False)
        logged[weighting] = panel.history[0]
        module.eval()
        with torch.no_grad():
            activations = module.net.forward_features(images)
        maps = head_cams(module, activations, (SIZE, SIZE), ClassLogits(), labels, weighting)
        expected = float(heatmap_ratio(maps, boxes).mean())
        assert logged[weighting]["val/cam_heatmap_ratio"] == pytest.approx(expected, abs=1e-4), weighting
    ratios = [logged[w]["val/cam_heatmap_ratio"] for w in logged]
    assert all(ratios[i] != pytest.approx(ratios[j]) for i in range(4) for j in range(i + 1, 4)), logged


def test_method_must_fit_the_model(synthetic_cub, tmp_path):
    data = data_for(synthetic_cub, "classifier")
    trainer = trainer_for(tmp_path, 1, [CAMPanel(method="embeddingcam")])
    with pytest.raises(ValueError, match="embeddingcam.*cam_method='gradcam'"):
        trainer.validate(module_for("classifier", data), datamodule=data, verbose=False)


# --- what a run logs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, proxy",
    [("classifier", "normalized_mean"), ("embedding", "normalized_mean"), ("embedding", "single_point_nearest")],
)
def test_one_panel_per_epoch_with_boxes_captions_and_metrics(synthetic_cub, offline, kind, proxy):
    epochs, num = 2, 6
    data = data_for(synthetic_cub, kind)
    logger = wandb_logger(offline)
    panel = CAMPanel(num_images=num, proxy=proxy)
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
    primary_cam_boxes = 0
    for epoch, row in enumerate(panels):
        media = row[PANEL_KEY]
        assert media["_type"] == "images/separated" and media["count"] == num
        # The panel row carries its epoch and the step of that epoch's val/* metrics (one below global_step).
        metrics = [r for r in rows if r.get("epoch") == epoch and "val/cam_max_box_acc" in r]
        assert row["epoch"] == epoch and len(metrics) == 1
        assert row["trainer/global_step"] == metrics[0]["trainer/global_step"] == (epoch + 1) * steps_per_epoch - 1
        assert panel_indices(row) == panel.panel
        for caption, index in zip(media["captions"], panel.panel):
            assert f"#{index}, epoch {epoch}" in caption
            assert f"true: {dataset.class_names[dataset.labels[index]]}" in caption
            assert ("nearest #" if proxy == "single_point_nearest" else "pred: ") in caption
        assert (media["width"], media["height"]) == (2 * SIZE + GAP, SIZE)
        for filename, boxes, index in zip(media["filenames"], media["all_boxes"], panel.panel):
            pixels = np.asarray(Image.open(run_dir / "files" / filename).convert("RGB"))
            assert pixels.shape == (SIZE, 2 * SIZE + GAP, 3) and pixels.std() > 10  # decodes, not blank
            assert set(boxes) == {"ground_truth", "cam"}
            groups = {key: json.loads((run_dir / "files" / group["path"]).read_text()) for key, group in boxes.items()}
            gt = groups["ground_truth"]["box_data"][0]
            x, y, w, h = dataset[index]["box"].tolist()
            assert gt["class_id"] == dataset.labels[index] and gt["domain"] == "pixel"
            assert gt["position"] == {"minX": round(x), "maxX": round(x + w), "minY": round(y), "maxY": round(y + h)}
            assert groups["ground_truth"]["class_labels"][str(gt["class_id"])] == dataset.class_names[gt["class_id"]]
            for box in groups["cam"]["box_data"]:  # each CAM box lies inside the cell of its map
                position = box["position"]
                left = 0 if position["maxX"] <= SIZE else SIZE + GAP
                assert left <= position["minX"] < position["maxX"] <= left + SIZE
                assert 0 <= position["minY"] < position["maxY"] <= SIZE
                primary_cam_boxes += left == 0
    # A barely trained net's GradCAM is often flat (the ReLU of a negative sum: no box); seeded, 5 of the
    # classifier's 12 primary maps have one, as before the refactoring, and 12 of 12 for the embedding nets.
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
    """val/cam_table: one incremental table, each panel epoch's rows an increment (in the run's files, pixels in
    its run_table artifacts), the CAM scores defined with summary max, and the evolution (image list and GIF) once
    at the end, also as files."""
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
        assert columns["overlay"] == ["Image"] * num  # the pixels wait in the run_table artifact
        assert columns["true"] == [dataset.class_names[dataset.labels[i]] for i in panel.panel]
        assert all(0 <= v <= 1 for key in ("score", "cam_box_iou", "heatmap_ratio") for v in columns[key])
        assert all(isinstance(v, bool) for v in columns["peak_in_box"])
    records = list(read_records(finished_log(run_dir)))
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    tables = [a for a in artifacts if a.type == "wandb-run-incremental-table" and "valcam_table" in a.name]
    assert len(tables) == epochs and len({a.name for a in tables}) == 1  # one table, an increment per epoch
    for artifact in tables:
        images = [entry for entry in artifact.manifest.contents if entry.path.endswith(".png")]
        assert len(images) == num
        for entry in images:
            pixels = np.asarray(Image.open(entry.local_path).convert("RGB"))
            assert pixels.shape == (SIZE, 2 * SIZE + GAP, 3) and pixels.std() > 10
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
    """The strips go to W&B as PNG files from a temporary folder; a run that may symlink media gets the arrays
    instead (a symlink into the deleted folder would dangle). Both runs' images hold the same pixels."""
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
        rows = panel_rows(run_dir)
        assert len(rows) == 1
        media = rows[0][PANEL_KEY]
        files = [run_dir / "files" / filename for filename in media["filenames"]]
        assert all(f.is_file() and not f.is_symlink() for f in files)
        pixels[symlink] = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    assert all(np.array_equal(a, b) and a.std() > 10 for a, b in zip(pixels[False], pixels[True]))


def test_the_panel_row_made_off_the_loop_s_thread_is_the_one_wandb_makes(synthetic_cub, offline, monkeypatch):
    """The staging binds the panel's files to the run and makes the row's entry (serialized_images), the commit adds
    the box groups' class labels to the run's config: the same row, files and config as wandb's own run.log of the
    images (serialized_images off), apart from the part of the file names that says when they were bound."""
    from cubcam.callbacks import sinks

    data = data_for(synthetic_cub, "classifier")
    made = {}
    for native in (False, True):
        if native:
            monkeypatch.setattr(sinks, "serialized_images", lambda *args: None)
        logger = wandb_logger(offline / str(native))
        pl.seed_everything(0, verbose=False)
        trainer_for(offline, 1, [CAMPanel(num_images=4)], logger=logger).validate(
            module_for("classifier", data), datamodule=data, verbose=False
        )
        run_dir = finished_run(logger)
        (row,) = panel_rows(run_dir)
        media = row[PANEL_KEY]
        files = [run_dir / "files" / f for f in media["filenames"]]
        files += [run_dir / "files" / boxes[k]["path"] for boxes in media["all_boxes"] for k in sorted(boxes)]
        assert all(f.is_file() and f.stat().st_size for f in files)
        shape = {
            **media,
            "filenames": None,
            "all_boxes": [{k: g["_type"] for k, g in b.items()} for b in media["all_boxes"]],
        }
        configs = [r.config for r in read_records(finished_log(run_dir)) if r.WhichOneof("record_type") == "config"]
        labels = {}
        for config in configs:  # the last value of each class-label singleton
            for item in config.update:
                if item.key == "_wandb":
                    labels.update(json.loads(item.value_json).get(sinks.BOX_LABELS, {}))
        made[native] = (shape, [f.read_bytes() for f in files], labels)
        # wandb names the files by its history step; staged, they carry the epoch's step: the path was taken
        assert all(("_step" in name) != native for name in media["filenames"])
    assert made[False][0] == made[True][0]
    assert made[False][1] == made[True][1]  # the same PNGs and box groups, byte for byte
    assert set(made[True][2]) == {f"{PANEL_KEY}_wandb_delimeter_{g}" for g in ("ground_truth", "cam")}
    assert made[False][2] == made[True][2]


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
    assert len(rows) == 1 and "epoch 1" in rows[0][PANEL_KEY]["captions"][0]
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


def test_state_keys_tell_every_panel_apart_and_the_old_key_still_resumes() -> None:
    """Two panels that differ in any option that changes what they show keep their own state; a checkpoint written
    under the key of STATE_VERSION 1 (it named num_images, method and proxy only; the deprecated "single_point"
    for the nearest image) is filed under today's key before Lightning looks it up."""
    base = CAMPanel()
    variants = [
        CAMPanel(weighting="gradcam++"),
        CAMPanel(target_layer="net.backbone.layer4"),
        CAMPanel(target="predicted"),
        CAMPanel(proxy="single_point_random"),
        CAMPanel(num_images=4),
    ]
    assert len({base.state_key, *(v.state_key for v in variants)}) == 1 + len(variants)
    assert CAMPanel(seed=5).state_key == base.state_key  # another seed still resumes the same birds
    with pytest.warns(DeprecationWarning, match="'single_point_nearest'"):
        old_spelling = CAMPanel(proxy="single_point")
    assert old_spelling.proxy == "single_point_nearest"
    assert old_spelling.state_key == CAMPanel(proxy="single_point_nearest").state_key
    v1_key = "CAMPanel{'num_images': 16, 'method': 'auto', 'proxy': 'single_point'}"
    saved = {"panel": [3, 1], "subset": [0, 1, 2, 3], "evolution": {}}  # no version: layout 1
    checkpoint = {"callbacks": {v1_key: saved}}
    old_spelling.on_load_checkpoint(None, None, checkpoint)  # type: ignore[arg-type]
    old_spelling.load_state_dict(checkpoint["callbacks"][old_spelling.state_key])
    assert old_spelling.panel == [3, 1] and old_spelling.subset == [0, 1, 2, 3]
    assert old_spelling.state_dict()["version"] == 3 and old_spelling.state_dict()["pending"] == []
    with pytest.raises(ValueError, match="version 4 is newer"):
        base.load_state_dict({"version": 4})


# --- staying out of training's way ------------------------------------------------------------------------------


class DrawsRandomNumbers(pl.Callback):
    """A careless callback: draws from the global RNG at every validation epoch end."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.rand(1)


@pytest.mark.parametrize("kind, proxy", [("classifier", "normalized_mean"), ("embedding", "single_point_nearest")])
def test_weights_are_bit_identical_with_and_without_the_callback(synthetic_cub, tmp_path, kind, proxy):
    def train(callbacks: list[pl.Callback]) -> dict[str, torch.Tensor]:
        pl.seed_everything(0, verbose=False)
        data = data_for(synthetic_cub, kind)
        module = module_for(kind, data)
        trainer_for(tmp_path, 2, callbacks).fit(module, datamodule=data)
        return module.state_dict()

    plain = train([])
    with_panel = train([CAMPanel(num_images=4, proxy=proxy)])
    assert plain.keys() == with_panel.keys()
    different = [k for k in plain if not torch.equal(plain[k], with_panel[k])]
    assert different == []
    if kind == "classifier":  # the comparison can fail: one random number drawn at the wrong time changes training
        careless = train([DrawsRandomNumbers()])
        assert any(not torch.equal(plain[k], careless[k]) for k in plain)


def test_validation_leaves_no_hooks_grads_bn_changes_or_rng_traces(synthetic_cub, tmp_path):
    data = data_for(synthetic_cub, "classifier")
    module = module_for("classifier", data)
    module.train()

    def validate(callbacks: list[pl.Callback]) -> tuple[dict, torch.Tensor]:
        torch.manual_seed(0)
        trainer_for(tmp_path, 1, callbacks).validate(module, datamodule=data, verbose=False)
        return {k: v.clone() for k, v in module.state_dict().items()}, torch.get_rng_state()

    state, rng = validate([])
    panel = CAMPanel(num_images=4)
    state_with, rng_with = validate([panel])
    assert panel.panel is not None and (tmp_path / "cam_panels" / "epoch_000.png").is_file()
    assert all(torch.equal(state[k], state_with[k]) for k in state)  # BatchNorm statistics included
    assert torch.equal(rng, rng_with)
    assert all(p.grad is None for p in module.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in module.modules())
    assert all(m.training for m in module.modules())  # Lightning restores train mode; so did the callback


def test_panel_from_the_validation_outputs_matches_a_fresh_forward(synthetic_cub, tmp_path):
    """The epoch that chooses the panel reads and runs the birds itself; later epochs reuse the loop's feature maps."""
    data = data_for(synthetic_cub, "classifier")
    module = module_for("classifier", data)
    panel = CAMPanel(num_images=4)
    png = tmp_path / "cam_panels" / "epoch_000.png"
    grids = []
    for _ in range(2):  # same weights, same epoch number: the same picture
        trainer_for(tmp_path, 1, [panel]).validate(module, datamodule=data, verbose=False)
        grids.append(np.asarray(Image.open(png).convert("RGB")).astype(int))
    assert grids[0].shape == grids[1].shape
    assert (np.abs(grids[0] - grids[1]) <= 2).mean() > 0.999  # batch-size rounding may move a few overlay values


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
    assert len(rows) == 1 and rows[0][PANEL_KEY]["count"] == 4 and rows[0][TABLE_KEY]["nrows"] == 4
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


# --- DDP -----------------------------------------------------------------------------------------------------------


def ddp_main(out: str, root: str, path: str) -> None:
    """Two CPU processes (gloo), two epochs, W&B offline on rank zero; last.ckpt for the test to check against.
    ``path``: "protocol" (the module's own activations) or "layer" (``target_layer``: the callback's own passes)."""
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    data = data_for(Path(root), "classifier")
    logger = wandb_logger(Path(out))
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=Path(out) / "ckpt", save_last=True)
    trainer = trainer_for(
        Path(out),
        2,
        [CAMPanel(num_images=4, target_layer=LAYER if path == "layer" else None), ckpt],
        logger=logger,
        strategy="ddp",
        devices=2,
        enable_checkpointing=True,
    )
    trainer.fit(module_for("classifier", data), datamodule=data)
    if trainer.is_global_zero:
        (Path(out) / "run_dir.txt").write_text(str(finished_run(logger)))


@pytest.mark.parametrize("path", ["protocol", "layer"])
def test_ddp_logs_one_panel_per_epoch_and_metrics_over_all_ranks(tmp_path, path):
    # 15 validation images: DistributedSampler pads rank 1 with a repeat of image 0, which must count once.
    root = make_synthetic_cub(tmp_path / "cub", classes=3, per_class=10, size=SIZE, seed=1).parent
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }  # the installed cubcam only, never the checkout
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "ddp", str(tmp_path), str(root), path],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path((tmp_path / "run_dir.txt").read_text())
    rows = history_rows(finished_log(run_dir))
    panels = [row for row in rows if PANEL_KEY in row]
    assert [row[PANEL_KEY]["count"] for row in panels] == [4, 4]  # one panel per epoch, from rank zero only
    assert panel_indices(panels[0]) == panel_indices(panels[1])
    assert "epoch 0" in panels[0][PANEL_KEY]["captions"][0] and "epoch 1" in panels[1][PANEL_KEY]["captions"][0]
    metric_rows = [row for row in rows if all(key in row for key in METRIC_KEYS)]
    assert [row["epoch"] for row in metric_rows] == [0, 1]

    # The last epoch's MaxBoxAccV2 is that of the final weights over all 15 images, not one rank's half.
    data = data_for(root, "classifier")
    data.setup("validate")
    module = Classifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt").eval()
    batch = [data.val_dataset[i] for i in range(len(data.val_dataset))]
    assert len(batch) == 15
    images = torch.stack([item["image"] for item in batch])
    labels = torch.tensor([item["label"] for item in batch])
    if path == "layer":  # the callback's own passes through the whole net: the engine's maps
        maps = torch.cat([GradCAM(module, LAYER)(images[i : i + 8], labels[i : i + 8]) for i in range(0, 15, 8)])
    else:
        with torch.no_grad():
            feature_maps = module.net.forward_features(images)
        maps = head_cams(module, feature_maps, (SIZE, SIZE), ClassLogits(), labels)
    boxes = torch.stack([item["box"] for item in batch])
    expected = localization.max_box_acc(maps, boxes)["max_box_acc"]
    assert metric_rows[-1]["val/cam_max_box_acc"] == pytest.approx(expected, abs=1e-6)


# --- the maps find the birds -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "quality", "floor", "lr", "margin"),
    [
        ("classifier", "val/acc", 0.6, 2e-3, 0.1),  # chance 0.25; 0.78-0.84 by thread count; CAM +0.20
        # A triplet net from scratch wants the lower lr. CAM +0.125 over the blob; scoring the cosine instead: +0.01.
        ("embedding", "val/precision_at_1", 0.6, 5e-4, 0.06),
    ],
)
def test_trained_maps_find_the_birds_better_than_a_centred_blob(tmp_path, kind, quality, floor, lr, margin):
    """The file's slow tests (10-20 s each): 8 epochs on 32 images at 96 px (6x6 maps), validated once.

    For the embedding net this pins down what EmbeddingCAM scores: the raw embedding y . p. Scoring the
    L2-normalised embedding (a cosine, saturated near 1 for confident images) gives maps no better than the blob.
    """
    size, epochs = 96, 8
    root = make_synthetic_cub(tmp_path / "cub", classes=4, per_class=16, size=128, seed=0).parent
    sampler = dict(sampler="m_per_class", m_per_class=4) if kind == "embedding" else {}
    data = CUBDataModule(root=str(root), image_size=size, batch_size=8, num_workers=0, val_fraction=0.0, **sampler)
    pl.seed_everything(0, verbose=False)
    panel = CAMPanel(num_images=4)
    trainer = trainer_for(tmp_path, epochs, [panel], check_val_every_n_epoch=epochs)
    trainer.fit(module_for(kind, data, lr=lr), datamodule=data)
    assert trainer.callback_metrics[quality] > floor  # it learned the birds
    cam_score = panel.history[epochs - 1]["val/cam_max_box_acc"]

    # The same metric for a centred Gaussian on every image (its threshold sweep tries every centred box size).
    boxes = torch.stack([data.val_dataset[i]["box"] for i in range(len(data.val_dataset))])
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = (size - 1) / 2
    blob = torch.exp(-((xs - centre) ** 2 + (ys - centre) ** 2) / (2 * (size / 4) ** 2))
    baseline = localization.max_box_acc(blob.expand(len(boxes), -1, -1), boxes)["max_box_acc"]
    assert cam_score > baseline + margin, (cam_score, baseline)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "ddp":
    ddp_main(sys.argv[2], sys.argv[3], sys.argv[4])


# --- diverged models, bad boxes, dry runs (issue "Nothing lost") --------------------------------------------------


class Diverge(pl.Callback):
    """Test probe: from epoch ``start`` on, the module's CAM layer (its backbone's output) is all NaN."""

    def __init__(self, start: int):
        self.start, self.handle = start, None

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        def hook(layer, inputs, output):
            return output * float("nan") if trainer.current_epoch >= self.start else output

        self.handle = module.net.backbone.register_forward_hook(hook)

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.handle.remove()


def test_a_diverged_classifier_logs_nan_cam_metrics_with_one_warning(synthetic_cub, tmp_path):
    """NaN maps were min-max normalised to zeros and scored as misses (0.0); now NaN, and one warning per run."""
    data = data_for(synthetic_cub, "classifier")
    panel = CAMPanel(num_images=4)
    trainer = trainer_for(tmp_path, 3, [panel, Diverge(start=1)], limit_train_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module_for("classifier", data), datamodule=data)
    assert all(np.isfinite(value) for value in panel.history[0].values())
    for key in METRIC_KEYS:
        assert np.isnan(panel.history[1][key]) and np.isnan(panel.history[2][key]), key
    told = [m for m in campanel_warnings(caught) if "training diverged" in m]
    assert len(told) == 1 and told[0].startswith("CAMPanel: training diverged at epoch 1: the CAM maps of 16 of 16")
    assert (tmp_path / "cam_panels" / "epoch_002.png").is_file(), campanel_warnings(caught)  # drawn, without heat


def test_a_diverged_embedding_net_logs_nan_and_stops_cleanly(synthetic_cub, tmp_path):
    """pytorch-metric-learning died on NaN embeddings ("the first len(query) elements of reference must be equal to
    query"); now the retrieval metrics are NaN, one warning says so, and training stops after that epoch."""
    data = data_for(synthetic_cub, "embedding")
    trainer = trainer_for(tmp_path, 4, [Diverge(start=1)], limit_train_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module_for("embedding", data), datamodule=data)
    assert trainer.current_epoch == 2  # epochs 0 and 1 ran; 2 and 3 did not
    assert torch.isnan(trainer.callback_metrics["val/precision_at_1"])
    told = [str(w.message) for w in caught if "training diverged" in str(w.message)]
    assert told == [
        "training diverged at epoch 1: 16 of 16 val embeddings are not finite; the val retrieval "
        "metrics are NaN; training stops"
    ]


def test_boxes_that_cannot_be_scored_are_left_out_by_dataset_index():
    from cubcam.callbacks.collect import EpochCollector

    collector = EpochCollector(panel=None, subset=[0, 1, 2, 3])
    images = torch.zeros(4, 3, 32, 32)
    step = {
        "index": torch.arange(4),
        "label": torch.zeros(4, dtype=torch.long),
        "output": torch.zeros(4, 2),
        "activations": torch.zeros(4, 8, 2, 2),
    }
    boxes = torch.tensor([[1.0, 1, 10, 10], [float("nan"), 1, 10, 10], [4, 4, -3, 5], [20, 20, 30, 30]])
    collector.add(step, images, boxes)
    assert collector.invalid_boxes == [1, 2]
    columns = collector.take_subset_columns()
    assert columns["index"].tolist() == [0, 3] and collector.subset_rows == []  # taken: held once
    assert columns["box"].tolist() == [[1, 1, 10, 10], [20, 20, 12, 12]]  # the last one clipped to the 32 px image


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


def test_each_evolution_strip_names_its_bird_on_the_strip(monkeypatch):
    """Stacked strips (TensorBoard's val/cam_evolution) had each bird's label under it, read as the next one's."""
    import cubcam.callbacks.evolution as evolution_module

    captions = []
    monkeypatch.setattr(evolution_module, "grid", lambda tiles, labels, **kw: captions.append(labels) or tiles[0])
    evolution = evolution_module.Evolution(
        indices=[7, 9], epochs=[0, 1], frames=[torch.zeros(2, 8, 8, 3, dtype=torch.uint8)] * 2
    )
    evolution.bird_strips()
    assert captions == [["#7, epoch 0", "epoch 1"], ["#9, epoch 0", "epoch 1"]]


# --- off the loop's thread (issue "Invisible on a GPU") ----------------------------------------------------------


def worker_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(WORKER_NAME)]


@pytest.mark.parametrize(("kind", "layer"), [("classifier", None), ("embedding", None), ("classifier", LAYER)])
def test_deferred_work_gives_the_synchronous_numbers_and_pictures(synthetic_cub, tmp_path, kind, layer):
    """The same run with the work inline (synchronous=True) and deferred: identical metrics every epoch and the
    same panel files; only the synchronous run puts them in callback_metrics."""
    data = data_for(synthetic_cub, kind)
    runs = {}
    for synchronous in (True, False):
        pl.seed_everything(0, verbose=False)
        folder = tmp_path / str(synchronous)
        method = "embeddingcam" if kind == "embedding" and layer else "auto"
        panel = CAMPanel(num_images=4, target_layer=layer, method=method, synchronous=synchronous)
        trainer = trainer_for(folder, 2, [panel], limit_train_batches=2)
        trainer.fit(module_for(kind, data), datamodule=data)
        pngs = [(folder / "cam_panels" / f"epoch_{e:03d}.png").read_bytes() for e in (0, 1)]
        runs[synchronous] = (panel.history, pngs, set(trainer.callback_metrics))
        assert worker_threads() == []
    (inline, inline_png, inline_keys), (deferred, deferred_png, deferred_keys) = runs[True], runs[False]
    assert sorted(inline) == [0, 1] and inline == deferred  # exactly, not approximately
    assert inline_png == deferred_png
    assert set(METRIC_KEYS) <= inline_keys and not set(METRIC_KEYS) & deferred_keys


def test_deferred_metrics_are_logged_at_their_epoch_s_step_in_epoch_order(synthetic_cub, offline):
    """W&B: each epoch's CAM metrics and panel in a row of their own at the step of that epoch's val/* metrics,
    with the epoch, once and in epoch order, though they are logged after the next epoch has started."""
    data = data_for(synthetic_cub, "classifier")
    logger = wandb_logger(offline)
    trainer_for(offline, 3, [CAMPanel(num_images=4)], logger=logger, limit_train_batches=2).fit(
        module_for("classifier", data), datamodule=data
    )
    rows = history_rows(finished_log(finished_run(logger)))
    val_steps = {row["epoch"]: row["trainer/global_step"] for row in rows if "val/acc" in row}
    scores = [row for row in rows if "val/cam_max_box_acc" in row]
    panels = [row for row in rows if PANEL_KEY in row]
    assert [row["epoch"] for row in scores] == [0, 1, 2] == [row["epoch"] for row in panels]
    assert [row["trainer/global_step"] for row in scores] == [val_steps[e] for e in (0, 1, 2)]
    assert [row["trainer/global_step"] for row in panels] == [val_steps[e] for e in (0, 1, 2)]
    assert all(key in row for row in scores for key in METRIC_KEYS)


class Kill(pl.Callback):
    """Test probe: SIGKILL (nothing runs on the way out) when epoch ``epoch`` starts; epoch ``epoch - 1``'s panel
    work is then pending in last.ckpt and not yet logged."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_main(out: str, root: str) -> None:
    """The killed run of the test below (a process of its own)."""
    torch.set_num_threads(1)
    data = data_for(Path(root), "classifier")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=Path(out) / "ckpt", save_last=True)
    callbacks = [CAMPanel(num_images=4), Kill(2), ckpt]
    trainer = trainer_for(Path(out), 3, callbacks, enable_checkpointing=True, limit_train_batches=2)
    trainer.fit(module_for("classifier", data), datamodule=data)


def test_a_killed_run_resumed_logs_every_epoch_s_panel_once(synthetic_cub, tmp_path):
    """Killed (SIGKILL) as epoch 2 starts, with epoch 1's work pending in last.ckpt: the resumed run finishes epoch
    1 from the checkpoint and trains epoch 2; each epoch's panel and metrics are logged once over both processes,
    and the evolution has every epoch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "kill", str(tmp_path), str(synthetic_cub)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    # The killed run logged epoch 0 (its ledger says so) and died with epoch 1 pending in last.ckpt.
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("CAMPanel")]
    assert [work["epoch"] for work in state["pending"]] == [1]
    assert [line.rpartition("\t")[2] for line in (tmp_path / "ckpt" / LEDGER).read_text().splitlines()] == ["0"]

    data = data_for(synthetic_cub, "classifier")
    resumed_root = tmp_path / "resumed"
    panel = CAMPanel(num_images=4)
    trainer = trainer_for(resumed_root, 3, [panel], limit_train_batches=2)
    trainer.fit(module_for("classifier", data), datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    resumed = sorted(p.name for p in (resumed_root / "cam_panels").glob("epoch_*.png"))
    assert resumed == ["epoch_001.png", "epoch_002.png"]  # with the killed run's: every epoch once
    assert sorted(panel.history) == [1, 2] and panel.evolution.epochs == [0, 1, 2]


class Raise(pl.Callback):
    def __init__(self, error: BaseException):
        self.error = error

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise self.error


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_exception_or_ctrl_c_drains_the_work_and_leaves_no_thread(synthetic_cub, tmp_path, error):
    data = data_for(synthetic_cub, "classifier")
    trainer = trainer_for(tmp_path, 3, [CAMPanel(num_images=4), Raise(error)], limit_train_batches=2)
    with pytest.raises((RuntimeError, SystemExit)):
        trainer.fit(module_for("classifier", data), datamodule=data)
    assert (tmp_path / "cam_panels" / "epoch_000.png").is_file()  # epoch 0's pending panel was finished
    assert worker_threads() == []


def test_a_failing_worker_is_a_warning_per_epoch_and_training_goes_on(synthetic_cub, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise MemoryError("the worker ran out of memory")

    monkeypatch.setattr(cam_panel, "finish", broken)
    data = data_for(synthetic_cub, "classifier")
    trainer = trainer_for(tmp_path, 2, [CAMPanel(num_images=4)], limit_train_batches=2)
    with pytest.warns(CAMPanelWarning) as caught:
        trainer.fit(module_for("classifier", data), datamodule=data)
    failed = [m for m in campanel_warnings(caught) if "the panel worker failed" in m]
    assert len(failed) == 2 and "MemoryError: the worker ran out of memory" in failed[0], failed
    assert trainer.current_epoch == 2 and worker_threads() == []


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "kill":
    kill_main(sys.argv[2], sys.argv[3])


def test_labelling_processes_give_the_same_numbers_and_are_joined(synthetic_cub, tmp_path, monkeypatch):
    """With the box labelling forced into worker processes (a real run uses them from 64 maps of 224 px up): the
    numbers of scoring in the worker thread, and no process left after a fit or after Ctrl-C."""
    data = data_for(synthetic_cub, "classifier")
    logged = {}
    for forced in (False, True):
        for module in (cam_panel, measure):
            monkeypatch.setattr(module, "pays_off", lambda count, size, forced=forced: forced)
        pl.seed_everything(0, verbose=False)
        panel = CAMPanel(num_images=4)
        trainer_for(tmp_path / str(forced), 2, [panel], limit_train_batches=2).fit(
            module_for("classifier", data), datamodule=data
        )
        logged[forced] = panel.history
        assert multiprocessing.active_children() == []
    assert sorted(logged[True]) == [0, 1] and logged[True] == logged[False]
    trainer = trainer_for(tmp_path / "interrupted", 3, [CAMPanel(num_images=4), Raise(KeyboardInterrupt())])
    with pytest.raises(SystemExit):
        trainer.fit(module_for("classifier", data), datamodule=data)
    assert multiprocessing.active_children() == [] and worker_threads() == []
    assert (tmp_path / "interrupted" / "cam_panels" / "epoch_000.png").is_file()
