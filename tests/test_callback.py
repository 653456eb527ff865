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

from cubcam.callbacks import CAMPanel, CAMPanelWarning
from cubcam.callbacks.epoch_maps import METRIC_KEYS
from cubcam.callbacks.panel_select import random_subset, spread_over_classes
from cubcam.callbacks.picture_thread import THREAD_NAME
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
    """The birds of a logged panel, from its grid's caption (``epoch N: #i #j ...``)."""
    return [int(i) for i in re.findall(r"#(\d+)", row[PANEL_KEY]["caption"])]


class CamMetrics(pl.Callback):
    """Test probe: the CAM metrics in ``trainer.callback_metrics`` after each validation epoch, ``{epoch: {key:
    value}}`` (an epoch without them has none)."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict[str, float]] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        found = {k: float(v) for k, v in trainer.callback_metrics.items() if k in METRIC_KEYS}
        if found and not trainer.sanity_checking:
            self.epochs[trainer.current_epoch] = found


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
        ({"method": "lime"}, "CAM method must be one of"),
        ({"kind": "gradcam"}, "kind"),
        ({"proxy": "mean"}, "proxy"),
        ({"target": "both"}, "target"),
        ({"alpha": 2}, "alpha"),
        ({"colormap": "viridis"}, "colormap"),
        ({"metrics_subset": 0}, "metrics_subset"),
        ({"method": "embeddingcam"}, "a model kind, not a CAM method"),
        ({"method": "scorecam"}, "'scorecam' needs a forward of the whole model per channel and image"),
        ({"method": "ablationcam", "target_layer": "net.layer4"}, "'ablationcam' with target_layer needs"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CAMPanel(**kwargs)


def test_the_method_reaches_the_metrics(synthetic_cub, tmp_path):
    """CAMPanel(method=...) scores the maps of that method: val/cam_heatmap_ratio equals the ratio of the
    head-only maps computed here with it, and differs between methods."""
    from cubcam.cams.localization import heatmap_ratio

    data = data_for(synthetic_cub, "classifier")
    module = module_for("classifier", data)
    data.setup("validate")
    items = [data.val_dataset[i] for i in range(len(data.val_dataset))]
    images, labels = torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])
    boxes = torch.stack([it["box"] for it in items])
    logged = {}
    # (HiResCAM equals GradCAM under a pooled linear head); the gradient-free ones the loop can afford
    for method in ("gradcam", "layercam", "ablationcam", "eigencam"):
        trainer = trainer_for(tmp_path, 1, [CAMPanel(num_images=2, method=method)])
        trainer.validate(module, datamodule=data, verbose=False)
        logged[method] = {key: float(trainer.callback_metrics[key]) for key in METRIC_KEYS}
        module.eval()
        with torch.no_grad():
            activations = module.net.forward_features(images)
        maps = head_cams(module, activations, (SIZE, SIZE), ClassLogits(), labels, method)
        expected = float(heatmap_ratio(maps, boxes).mean())
        assert logged[method]["val/cam_heatmap_ratio"] == pytest.approx(expected, abs=1e-4), method
    ratios = [logged[w]["val/cam_heatmap_ratio"] for w in logged]
    assert all(ratios[i] != pytest.approx(ratios[j]) for i in range(4) for j in range(i + 1, 4)), logged


def test_kind_must_fit_the_model(synthetic_cub, tmp_path):
    data = data_for(synthetic_cub, "classifier")
    trainer = trainer_for(tmp_path, 1, [CAMPanel(kind="embedding")])
    with pytest.raises(ValueError, match="kind='embedding' does not fit a module with cam_kind='classifier'"):
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
    strip = 2 * SIZE + GAP  # a bird's two cells
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
            x, y, w, h = dataset[index]["box"].tolist()
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
            left = 4 + k * (strip + 4) + (0 if offset < SIZE else SIZE + GAP)
            assert left <= position["minX"] < position["maxX"] <= left + SIZE
            primary_cam_boxes += offset < SIZE
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


def test_state_keys_tell_every_panel_apart() -> None:
    """Two panels that differ in any option that changes what they show keep their own state; the seed does not
    count (a resumed run with another seed shows the birds it showed)."""
    base = CAMPanel()
    variants = [
        CAMPanel(method="gradcam++"),
        CAMPanel(target_layer="net.backbone.layer4"),
        CAMPanel(target="predicted"),
        CAMPanel(proxy="single_point_random"),
        CAMPanel(num_images=4),
    ]
    assert len({base.state_key, *(v.state_key for v in variants)}) == 1 + len(variants)
    assert CAMPanel(seed=5).state_key == base.state_key
    assert set(base.state_dict()) == {"panel", "subset", "evolution"}


def frame(epoch: int, indices: list[int], size: int = 8):
    """An evolution frame of ``indices`` birds: grey pixels, a map peaked in the middle, a box around it."""
    from cubcam.callbacks.evolution import Frame

    n = len(indices)
    maps = torch.zeros(n, 4, 4)
    maps[:, 1:3, 1:3] = 1.0
    boxes = torch.tensor([[2.0, 2, 4, 4]]).repeat(n, 1)
    return Frame(epoch, indices, torch.full((n, size, size, 3), 128, dtype=torch.uint8), maps, boxes, 0.5)


def evolution_state(epochs: list[int], indices: list[int]) -> dict:
    from cubcam.callbacks.evolution import Evolution

    evolution = Evolution()
    for epoch in epochs:
        evolution.add(frame(epoch, indices))
    return evolution.state_dict()


GOOD = evolution_state([1, 3], [1, 2, 3])


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        ({"panel": [3, 1]}, "expected panel, subset and evolution"),
        ({"panel": [3, -1], "subset": None, "evolution": GOOD}, "panel must be None or a list of dataset indices"),
        ({"panel": "3", "subset": None, "evolution": GOOD}, "panel must be None"),
        ({"panel": None, "subset": None, "evolution": {**GOOD, "epochs": [1]}}, "pixels must be [1, 3, -1, -1, 3]"),
        ({"panel": None, "subset": None, "evolution": {**GOOD, "pixels": [[1]]}}, "pixels must be a uint8 tensor"),
        ({"panel": None, "subset": None, "evolution": {**GOOD, "maps": GOOD["pixels"]}}, "maps must be a float"),
        ({"panel": None, "subset": None, "evolution": {**GOOD, "epochs": [1, 1]}}, "an epoch twice"),
        ({"panel": None, "subset": None, "evolution": [1, 2]}, "must have indices, epochs, pixels"),
    ],
)
def test_a_corrupt_or_foreign_state_is_one_warning_and_a_fresh_choice(state, problem) -> None:
    panel = CAMPanel()
    with pytest.warns(CAMPanelWarning, match="not one this CAMPanel wrote") as caught:
        panel.load_state_dict(state)
    assert len(caught) == 1 and problem in str(caught[0].message), str(caught[0].message)
    assert panel.panel is None and panel.subset is None and len(panel.evolution) == 0
    good = {"panel": [1, 2, 3], "subset": [0, 4], "evolution": GOOD}
    panel.load_state_dict(good)  # a state it wrote loads without a word
    assert panel.panel == [1, 2, 3] and panel.subset == [0, 4] and panel.evolution.epochs == [1, 3]
    assert panel.state_dict()["evolution"]["pixels"].equal(GOOD["pixels"])
    with pytest.warns(CAMPanelWarning, match="saved with other options"):  # state under another panel's key
        panel.on_load_checkpoint(None, None, {"callbacks": {CAMPanel(num_images=4).state_key: good}})  # type: ignore[arg-type]


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
    cam = {key: float(trainer.callback_metrics[key]) for key in METRIC_KEYS}
    (Path(out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(cam))
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
    assert [len(panel_indices(row)) for row in panels] == [4, 4]  # one panel per epoch, from rank zero only
    assert panel_indices(panels[0]) == panel_indices(panels[1])
    assert [row[PANEL_KEY]["caption"][:8] for row in panels] == ["epoch 0:", "epoch 1:"]
    metric_rows = [row for row in rows if all(key in row for key in METRIC_KEYS)]
    assert [row["epoch"] for row in metric_rows] == [0, 1] and all("val/acc" in row for row in metric_rows)
    # Every rank holds the same CAM metrics in callback_metrics: the last epoch's, as logged.
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == pytest.approx({key: metric_rows[-1][key] for key in METRIC_KEYS}, abs=1e-6)

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
    trainer = trainer_for(tmp_path, epochs, [CAMPanel(num_images=4)], check_val_every_n_epoch=epochs)
    trainer.fit(module_for(kind, data, lr=lr), datamodule=data)
    assert trainer.callback_metrics[quality] > floor  # it learned the birds
    cam_score = float(trainer.callback_metrics["val/cam_max_box_acc"])

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
    logged = CamMetrics()
    trainer = trainer_for(tmp_path, 3, [CAMPanel(num_images=4), Diverge(start=1), logged], limit_train_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module_for("classifier", data), datamodule=data)
    assert all(np.isfinite(value) for value in logged.epochs[0].values())
    for key in METRIC_KEYS:
        assert np.isnan(logged.epochs[1][key]) and np.isnan(logged.epochs[2][key]), key
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
    evolution = evolution_module.Evolution()
    for epoch in (1, 0):
        evolution.add(frame(epoch, [7, 9]))
    evolution.bird_strips(evolution.tiles("jet", 0.5))
    assert captions == [["#7, epoch 0", "epoch 1"], ["#9, epoch 0", "epoch 1"]]


# --- metrics on the loop, pictures on one thread (issue "A callback with one thread") ------------------------------


def picture_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


@pytest.mark.parametrize(("kind", "layer"), [("classifier", None), ("embedding", None), ("classifier", LAYER)])
def test_cam_metrics_are_lightning_metrics_every_epoch(synthetic_cub, tmp_path, kind, layer):
    """The CAM metrics are in trainer.callback_metrics after each validation epoch, with the values of the maps
    the engine makes of the final weights (the last epoch), and a ModelCheckpoint can monitor them."""
    data = data_for(synthetic_cub, kind)
    pl.seed_everything(0, verbose=False)
    forced = "embedding" if kind == "embedding" and layer else "auto"
    logged = CamMetrics()
    best = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "best", monitor="val/cam_max_box_acc", mode="max")
    panel = CAMPanel(num_images=4, target_layer=layer, kind=forced)
    trainer = trainer_for(tmp_path, 2, [panel, logged, best], limit_train_batches=2, enable_checkpointing=True)
    module = module_for(kind, data)
    trainer.fit(module, datamodule=data)
    assert sorted(logged.epochs) == [0, 1] and all(set(row) == set(METRIC_KEYS) for row in logged.epochs.values())
    assert float(best.best_model_score) == max(row["val/cam_max_box_acc"] for row in logged.epochs.values())
    assert picture_threads() == []
    assert sorted(p.name for p in (tmp_path / "cam_panels").glob("epoch_*")) == ["epoch_000.png", "epoch_001.png"]
    if kind == "classifier":  # the same number from the engine's maps of the final weights, over every image
        data.setup("validate")
        items = [data.val_dataset[i] for i in range(len(data.val_dataset))]
        images, labels = torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])
        module.eval()
        if layer is None:
            with torch.no_grad():
                maps = head_cams(module, module.net.forward_features(images), (SIZE, SIZE), ClassLogits(), labels)
        else:
            maps = GradCAM(module, LAYER)(images, labels)
        expected = localization.max_box_acc(maps, torch.stack([it["box"] for it in items]))["max_box_acc"]
        assert logged.epochs[1]["val/cam_max_box_acc"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("options", "checkpoint", "message"),
    [
        ({"every_n_epochs": 2}, {}, r"CAMPanel\(every_n_epochs=2\) logs it every 2 epochs"),
        ({"log_metrics": False}, {}, r"CAMPanel\(log_metrics=False\) logs it never"),
        ({"every_n_epochs": 2}, {"every_n_epochs": 3}, "every 2 epochs"),
    ],
)
def test_monitoring_a_cam_metric_on_epochs_without_it_is_one_error(
    synthetic_cub, tmp_path, options, checkpoint, message
):
    data = data_for(synthetic_cub, "classifier")
    best = pl.callbacks.ModelCheckpoint(monitor="val/cam_max_box_acc", **checkpoint)
    trainer = trainer_for(tmp_path, 2, [CAMPanel(num_images=4, **options), best], enable_checkpointing=True)
    with pytest.raises(ValueError, match=r"ModelCheckpoint\(monitor='val/cam_max_box_acc'\) needs") as raised:
        trainer.fit(module_for("classifier", data), datamodule=data)
    assert re.search(message, str(raised.value)) and "\n" not in str(raised.value)
    stopping = pl.callbacks.EarlyStopping(monitor="val/cam_max_box_acc", mode="max")
    with pytest.raises(ValueError, match="EarlyStopping"):
        trainer_for(tmp_path, 2, [CAMPanel(num_images=4, every_n_epochs=2), stopping]).fit(
            module_for("classifier", data), datamodule=data
        )
    # A checkpoint that looks only on the epochs CAMPanel measures is fine, and gets the metric.
    matching = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "c", monitor="val/cam_max_box_acc", every_n_epochs=2)
    panel = CAMPanel(num_images=4, every_n_epochs=2)
    trainer_for(tmp_path, 2, [panel, matching], enable_checkpointing=True, limit_train_batches=1).fit(
        module_for("classifier", data), datamodule=data
    )
    assert matching.best_model_score is not None and matching.best_model_path.endswith("epoch=1-step=2.ckpt")


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


class Kill(pl.Callback):
    """Test probe: SIGKILL (nothing runs on the way out) when epoch ``epoch`` starts, while its picture thread may
    still be drawing the epoch before."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            (Path(trainer.default_root_dir) / "pid").write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def kill_main(out: str, root: str) -> None:
    """The killed run of the test below (a process of its own)."""
    torch.set_num_threads(1)
    data = data_for(Path(root), "classifier")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=Path(out) / "ckpt", save_last=True)
    callbacks = [CAMPanel(num_images=4), Kill(2), ckpt]
    trainer = trainer_for(Path(out), 3, callbacks, enable_checkpointing=True, limit_train_batches=2)
    trainer.fit(module_for("classifier", data), datamodule=data)


def test_a_killed_run_leaves_no_process_and_resumes_with_its_evolution(synthetic_cub, tmp_path):
    """Killed (SIGKILL) as epoch 2 starts: no process of it is left, last.ckpt holds the panel and the thumbnails
    of epochs 0 and 1 (made on the loop's thread, nothing pending), and the resumed run's evolution has every
    epoch once."""
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
    killed = int((tmp_path / "pid").read_text())
    survivors = [
        p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == killed
    ]  # its children: re-parented, they would still name it nowhere; none may exist at all
    assert survivors == [] and not Path(f"/proc/{killed}").exists()
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("CAMPanel")]
    assert set(state) == {"panel", "subset", "evolution"} and state["evolution"]["epochs"] == [0, 1]

    data = data_for(synthetic_cub, "classifier")
    resumed_root = tmp_path / "resumed"
    panel = CAMPanel(num_images=4)
    trainer = trainer_for(resumed_root, 3, [panel], limit_train_batches=2)
    trainer.fit(module_for("classifier", data), datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    resumed = sorted(p.name for p in (resumed_root / "cam_panels").glob("epoch_*.png"))
    assert resumed == ["epoch_002.png"] and panel.evolution.epochs == [0, 1, 2]
    assert panel.panel == state["panel"]


def _parent(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


class Raise(pl.Callback):
    def __init__(self, error: BaseException):
        self.error = error

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise self.error


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_exception_or_ctrl_c_logs_the_drawn_panels_and_leaves_no_thread(synthetic_cub, tmp_path, error):
    data = data_for(synthetic_cub, "classifier")
    trainer = trainer_for(tmp_path, 3, [CAMPanel(num_images=4), Raise(error)], limit_train_batches=2)
    with pytest.raises((RuntimeError, SystemExit)):
        trainer.fit(module_for("classifier", data), datamodule=data)
    assert (tmp_path / "cam_panels" / "epoch_000.png").is_file()  # epoch 0's panel was drawn
    assert picture_threads() == []


def test_on_the_way_out_a_slow_picture_is_dropped_with_one_line(synthetic_cub, tmp_path, monkeypatch):
    """An exception while the picture thread is still drawing: the callback waits about EXIT_WAIT seconds, then
    drops the panel with one warning; the metrics of that epoch were logged already."""
    from cubcam.callbacks import cam_panel, picture_thread

    drawing = picture_thread.render

    released = threading.Event()  # epoch 0's picture waits 4 s, or until the test is done with it

    def slow(job):
        if job.epoch == 0:
            released.wait(4)
        return drawing(job)

    monkeypatch.setattr(picture_thread, "render", slow)
    monkeypatch.setattr(cam_panel, "EXIT_WAIT", 0.5)
    data = data_for(synthetic_cub, "classifier")
    logged = CamMetrics()
    trainer = trainer_for(
        tmp_path, 3, [CAMPanel(num_images=4), logged, Raise(RuntimeError("boom"))], limit_train_batches=2
    )
    with pytest.warns(CAMPanelWarning) as caught, pytest.raises(RuntimeError):
        trainer.fit(
            module_for("classifier", data),
            datamodule=data,
        )
    dropped = [m for m in campanel_warnings(caught) if "not yet drawn" in m]
    assert dropped == [
        "CAMPanel: the run ended with 1 panel(s) not yet drawn; they are dropped (the metrics were logged)"
    ]
    assert sorted(logged.epochs) == [0] and not (tmp_path / "cam_panels" / "epoch_000.png").exists()
    released.set()
    for thread in threading.enumerate():  # the dropped picture's thread (a daemon) ends with its picture
        if thread.name.startswith(THREAD_NAME):
            thread.join(10)
    assert picture_threads() == []


def test_a_failing_picture_is_a_warning_per_epoch_and_training_goes_on(synthetic_cub, tmp_path, monkeypatch):
    from cubcam.callbacks import picture_thread

    def broken(*args, **kwargs):
        raise MemoryError("the picture thread ran out of memory")

    monkeypatch.setattr(picture_thread, "render", broken)
    data = data_for(synthetic_cub, "classifier")
    logged = CamMetrics()
    trainer = trainer_for(tmp_path, 2, [CAMPanel(num_images=4), logged], limit_train_batches=2)
    with pytest.warns(CAMPanelWarning) as caught:
        trainer.fit(module_for("classifier", data), datamodule=data)
    failed = [m for m in campanel_warnings(caught) if "could not render the panel" in m]
    assert len(failed) == 2 and "MemoryError: the picture thread ran out of memory" in failed[0], failed
    assert trainer.current_epoch == 2 and picture_threads() == [] and sorted(logged.epochs) == [0, 1]


def test_a_bug_in_the_picture_thread_ends_the_run_with_its_own_error(synthetic_cub, tmp_path, monkeypatch):
    """Only running out of memory and a sink's failure are warnings; a bug raised on the picture thread is raised
    on the loop's thread, as it is, and no thread is left behind."""
    from cubcam.callbacks import picture_thread

    def buggy(*args, **kwargs):
        raise IndexError("a bug in the panel's layout")

    monkeypatch.setattr(picture_thread, "render", buggy)
    data = data_for(synthetic_cub, "classifier")
    trainer = trainer_for(tmp_path, 2, [CAMPanel(num_images=4)], limit_train_batches=2)
    with pytest.raises(IndexError, match="a bug in the panel's layout"):
        trainer.fit(module_for("classifier", data), datamodule=data)
    assert trainer.current_epoch < 2 and picture_threads() == []


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "kill":
    kill_main(sys.argv[2], sys.argv[3])
