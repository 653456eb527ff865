"""``cubcam evaluate`` on tiny checkpoints trained on synthetic CUB: its scores equal ``cubcam.cams.localization``
applied to maps computed here with the CAM engine through the whole net, its JSON is byte-identical between runs, and a
trained classifier localizes better than the centre-Gaussian baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from trained_checkpoints import SIZE, Trained

from cubcam.cams import EmbeddingCAM, GradCAM, normalized_mean_proxies
from cubcam.cams.localization import heatmap_ratio, max_box_acc, pointing_game
from cubcam.train.data.cub import CUBDataset, spread_indices
from cubcam.train.data.presets import EvalPreset
from cubcam.train.inspection.checkpoint import load_checkpoint
from cubcam.train.inspection.evaluate import main
from cubcam.train.inspection.sanity import SANITY_LEVEL

# These tests validate on the test split on purpose (val_fraction=0: every image of a tiny CUB counts).
pytestmark = pytest.mark.filterwarnings("ignore:val_fraction is 0:cubcam.CubcamWarning")


@pytest.fixture(scope="module")
def test_split(trained: Trained) -> dict[str, torch.Tensor]:
    """The whole test split as tensors, the way the evaluation preset gives it."""
    samples = list(CUBDataset(trained.root, split="test", transform=EvalPreset(SIZE)))
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in ("image", "label", "box", "parts")}


BATCH = 8  # evaluate's batches; the maps here are computed on the same batches, so they are the same to the bit


def run(checkpoint: Path, out: Path, *extra: str) -> tuple[dict, bytes]:
    main([str(checkpoint), "--out", str(out), "--num-workers", "0", "--batch-size", str(BATCH), *extra])
    return json.loads((out / "metrics.json").read_text()), (out / "metrics.json").read_bytes()


def batched(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn`` on consecutive batches of ``BATCH`` rows, concatenated (the maps are quantised to 8 bits for
    MaxBoxAccV2, so even a last-bit difference from another batch size could move a box)."""
    return torch.cat([fn(*(t[i : i + BATCH] for t in tensors)) for i in range(0, len(tensors[0]), BATCH)])


def expected_scores(maps: torch.Tensor, split: dict[str, torch.Tensor]) -> dict[str, float]:
    scores = {k: float(v) for k, v in max_box_acc(maps, split["box"]).items() if np.isscalar(v)}
    scores["heatmap_ratio"] = float(heatmap_ratio(maps, split["box"]).mean())
    scores["pointing_game"] = float(pointing_game(maps, boxes=split["box"]).mean())  # the callback's meaning
    pointed = np.asarray(pointing_game(maps, parts=split["parts"]), dtype=np.float64)
    scores["pointing_game_parts"] = float(np.nanmean(pointed))
    return scores


def assert_scores(reported: dict[str, float], expected: dict[str, float]) -> None:
    for key, value in expected.items():
        assert reported[key] == pytest.approx(value, abs=2e-6), key


def centre_gaussian_here(n: int) -> torch.Tensor:
    """The baseline from its definition: exp(-r^2 / (2 (0.25 n)^2)) about the image centre, min-max normalised."""
    centres = np.arange(n) + 0.5 - n / 2
    g = np.exp(-(centres[:, None] ** 2 + centres[None, :] ** 2) / (2 * (0.25 * n) ** 2))
    return torch.from_numpy((g - g.min()) / (g.max() - g.min())).float()


@pytest.fixture(scope="module")
def classifier_runs(trained: Trained, tmp_path_factory) -> tuple[dict, bytes, bytes]:
    out = tmp_path_factory.mktemp("evaluate")
    first, first_bytes = run(trained.classifier, out / "first")
    _, second_bytes = run(trained.classifier, out / "second")
    return first, first_bytes, second_bytes


def test_classifier_scores_equal_cams_localization_on_the_same_maps(
    classifier_runs, trained: Trained, test_split
) -> None:
    report = classifier_runs[0]
    assert report["num_images"] == len(test_split["label"]) and report["kind"] == "classifier"
    assert set(report["methods"]) == {"gradcam", "centre_gaussian"}
    module = load_checkpoint(trained.classifier).module
    maps = batched(GradCAM(module, module.cam_target_layer), test_split["image"], test_split["label"])  # true classes
    assert_scores(report["methods"]["gradcam"], expected_scores(maps, test_split))
    baseline = centre_gaussian_here(SIZE).expand(len(maps), -1, -1)
    assert_scores(report["methods"]["centre_gaussian"], expected_scores(baseline, test_split))


def test_metrics_json_is_identical_between_runs(classifier_runs) -> None:
    _, first, second = classifier_runs
    assert first == second
    assert list(json.loads(first)) == sorted(json.loads(first))


def test_trained_classifier_localizes_better_than_the_centre_baseline(classifier_runs) -> None:
    methods = classifier_runs[0]["methods"]
    gradcam, baseline = methods["gradcam"], methods["centre_gaussian"]
    # IoU 0.5 is where a fitted box beats a centred one most clearly (calibrated over seeds 0-3: +0.21 to +0.33;
    # MaxBoxAccV2 +0.04 to +0.15, pulled together by IoU 0.3, where the centre prior of a big bird always hits).
    assert gradcam["box_acc_iou50"] >= baseline["box_acc_iou50"] + 0.15, methods
    assert gradcam["max_box_acc"] > baseline["max_box_acc"], methods


def test_embedding_scores_equal_cams_localization_for_both_proxies(
    trained: Trained, tmp_path: Path, test_split
) -> None:
    report, _ = run(trained.embedding, tmp_path / "embedding", "--no-cache")  # reference embedded in batches of 8
    assert set(report["methods"]) == {"gradcam/normalized_mean", "gradcam/single_point_random", "centre_gaussian"}
    assert report["reference_split"] == "train"

    module = load_checkpoint(trained.embedding).module
    train_split = CUBDataset(trained.root, split="train", transform=EvalPreset(SIZE))
    with torch.no_grad():
        gallery = F.normalize(batched(module, torch.stack([s["image"] for s in train_split])), dim=1)
    labels = torch.tensor(train_split.labels)
    picks = torch.tensor(report["single_point_reference_indices"])
    assert (labels[picks] == torch.arange(len(picks))).all()  # one image of each class
    proxies = {
        "gradcam/normalized_mean": normalized_mean_proxies(gallery, labels),
        "gradcam/single_point_random": gallery[picks],
    }
    cam = EmbeddingCAM(module, module.cam_target_layer)
    for name, proxy in proxies.items():
        maps = batched(cam, test_split["image"], proxy[test_split["label"]])
        assert_scores(report["methods"][name], expected_scores(maps, test_split))


def test_methods_are_scored_side_by_side(trained: Trained, tmp_path: Path, test_split) -> None:
    """--methods a,b: one column per method (and, for an embedding net, per proxy scheme), each equal to
    cams.localization on the engine's maps of that method."""
    report, _ = run(trained.classifier, tmp_path / "classifier", "--methods", "gradcam,layercam")
    assert set(report["methods"]) == {"gradcam", "layercam", "centre_gaussian"}
    assert report["methods_asked"] == ["gradcam", "layercam"]
    module = load_checkpoint(trained.classifier).module
    maps = batched(
        GradCAM(module, module.cam_target_layer, method="layercam"), test_split["image"], test_split["label"]
    )
    assert_scores(report["methods"]["layercam"], expected_scores(maps, test_split))
    assert report["methods"]["layercam"] != report["methods"]["gradcam"]
    assert (
        "| metric | GradCAM | LayerCAM | centre Gaussian (baseline) |"
        in (tmp_path / "classifier" / "metrics.md").read_text()
    )

    report, _ = run(trained.embedding, tmp_path / "embedding", "--methods", "gradcam++")
    assert set(report["methods"]) == {
        "gradcam++/normalized_mean",
        "gradcam++/single_point_random",
        "centre_gaussian",
    }
    table = (tmp_path / "embedding" / "metrics.md").read_text()
    assert "EmbeddingCAM by GradCAM++ (normalized mean proxy)" in table
    for bad in (["--methods", "gradcam,lime"], ["--road-percentiles", "50,100"], ["--road-percentiles", "x"]):
        with pytest.raises(SystemExit):
            main([str(trained.classifier), *bad])


def test_gradient_free_methods_are_scored_on_the_engines_maps(trained: Trained, tmp_path: Path) -> None:
    """ScoreCAM (from the images: a forward per channel), AblationCAM (head-only) and EigenCAM in evaluate: each
    column equals cams.localization on the engine's maps of the same images, and the table names them. At 64 px
    (``--image-size``): ScoreCAM's 512 forwards of the whole model, twice, at a quarter of the pixels."""
    names, size = ("scorecam", "ablationcam", "eigencam"), 64
    report, _ = run(trained.classifier, tmp_path, "--methods", ",".join(names), "--limit", "1", "--image-size", "64")
    dataset = CUBDataset(trained.root, split="test", transform=EvalPreset(size))
    sample = dataset[spread_indices(len(dataset), 1)[0]]
    split = {key: torch.as_tensor(sample[key])[None] for key in ("image", "label", "box", "parts")}
    module = load_checkpoint(trained.classifier).module
    for name in names:
        maps = GradCAM(module, module.cam_target_layer, method=name)(split["image"], split["label"])
        assert_scores(report["methods"][name], expected_scores(maps, split))
    assert "| metric | ScoreCAM | AblationCAM | EigenCAM |" in (tmp_path / "metrics.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.root", "{tmp}/nowhere"], "nowhere does not exist; pass --data.root"),
        (["--data.split_scheme", "zero_shot", "--reference-split", "train"], "only come from the test split"),
        (["--split", "val"], "there is no val split: val_fraction is 0"),  # trained without one: val is not test
    ],
)
def test_bad_settings_give_one_clear_line(
    extra: list[str], message: str, trained: Trained, tmp_path: Path, capsys
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([str(trained.embedding), "--out", str(tmp_path / "out"), *(e.format(tmp=tmp_path) for e in extra)])
    assert exited.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error:") and message in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_the_callback_and_evaluate_report_the_same_scores_on_the_same_images(
    classifier_runs, trained: Trained, tmp_path
) -> None:
    """One accumulator, one explanation step: CAMPanel's val/cam_* over the whole validation split (the test
    split) equal evaluate's on the same checkpoint, also the pointing game (the peak inside the GT box)."""
    import pytorch_lightning as pl

    from cubcam.callbacks import CAMPanel
    from cubcam.callbacks.epoch_maps import METRIC_KEYS
    from cubcam.train.data.datamodule import CUBDataModule

    module = load_checkpoint(trained.classifier).module
    data = CUBDataModule(root=str(trained.root), image_size=SIZE, batch_size=BATCH, num_workers=0, val_fraction=0.0)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[CAMPanel(num_images=4)],
    )
    trainer.validate(module, datamodule=data, verbose=False)
    logged = {key: float(trainer.callback_metrics[key]) for key in METRIC_KEYS}
    report = classifier_runs[0]["methods"]["gradcam"]
    assert len(data.val_dataset) == classifier_runs[0]["num_images"]  # the subset is the whole split here
    for key, name in METRIC_KEYS.items():
        assert logged[key] == pytest.approx(report[name], abs=1e-6), key
    assert (CAMPanel().options.metrics_subset or 0) >= len(data.val_dataset)


@pytest.fixture(scope="module")
def faithfulness_runs(trained: Trained, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    out = tmp_path_factory.mktemp("faithfulness")
    runs = {}
    for kind, checkpoint in (("classifier", trained.classifier), ("embedding", trained.embedding)):
        # ROAD at one percentile, on the classifier only (its proxy score is checked against pytorch-grad-cam's in
        # test_road.py): 2 sparse solves per image and map
        road = "50" if kind == "classifier" else "none"
        extra = ("--faithfulness", "--steps", "4", "--road-percentiles", road)
        runs[kind] = (run(checkpoint, out / kind, *extra)[0], out / kind)
    return runs


FAITHFULNESS_KEYS = {"deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence"}


@pytest.mark.parametrize(("kind", "method"), [("classifier", "gradcam"), ("embedding", "gradcam/normalized_mean")])
def test_trained_cams_are_more_faithful_than_a_random_map(faithfulness_runs, kind: str, method: str) -> None:
    """Deleting the CAM's pixels first costs the score more, and inserting them first restores more of it, than
    doing so in a random map's order (both model kinds: softmax probability, clipped cosine to the proxy), and ROAD's
    imputation of its pixels too (the classifier)."""
    report, out = faithfulness_runs[kind]
    methods = report["methods"]
    for name in (method, "random", "centre_gaussian"):
        assert set(methods[name]) >= FAITHFULNESS_KEYS, name
        assert all(0 <= methods[name][key] <= 1 for key in FAITHFULNESS_KEYS), methods[name]
    assert methods[method]["deletion_auc"] < methods["random"]["deletion_auc"] - 0.1, methods
    assert methods[method]["insertion_auc"] > methods["random"]["insertion_auc"], methods
    assert methods[method]["average_drop"] < methods["random"]["average_drop"], methods
    assert report["faithfulness_steps"] == 4 and len(report["fractions"]) == 5
    assert all(len(report["curves"][name]["deletion_curve"]) == 5 for name in methods)
    if kind == "embedding":
        assert "road_combined" not in methods[method] and "road_percentiles" not in report  # --road-percentiles none
        assert "ROAD" not in (out / "metrics.md").read_text()  # no rows of what was not measured
        return
    for name in methods:  # ROAD at one percentile (50): imputing the map's top half costs more than a random half
        road = methods[name]
        assert road["road_combined"] == pytest.approx((road["road_lerf"] - road["road_morf"]) / 2, abs=2e-6), name
    assert methods[method]["road_morf"] < methods["random"]["road_morf"], methods
    assert methods[method]["road_combined"] > methods["random"]["road_combined"] + 0.05, methods
    assert report["road_percentiles"] == [50]


def test_faithfulness_curves_start_and_end_at_the_model_s_own_scores(
    faithfulness_runs, trained: Trained, test_split
) -> None:
    """The curves' map-independent ends, recomputed from the model: deletion starts at the mean probability of the
    true class and ends at that of the all-grey (mean-colour) image; insertion ends at the image's own."""
    report, _ = faithfulness_runs["classifier"]
    module = load_checkpoint(trained.classifier).module.eval()
    labels = test_split["label"]
    with torch.no_grad():
        own = module(test_split["image"]).softmax(1).gather(1, labels[:, None]).mean().item()
        grey = module(torch.zeros_like(test_split["image"])).softmax(1).gather(1, labels[:, None]).mean().item()
    for name, curves in report["curves"].items():
        assert curves["deletion_curve"][0] == pytest.approx(own, abs=1e-5), name
        assert curves["deletion_curve"][-1] == pytest.approx(grey, abs=1e-5), name
        assert curves["insertion_curve"][-1] == pytest.approx(own, abs=1e-5), name


def test_plots_and_the_per_class_table_are_written(faithfulness_runs, trained: Trained) -> None:
    from PIL import Image

    report, out = faithfulness_runs["classifier"]
    for name in ("box_accuracy.png", "deletion_insertion.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 600 and image.height > 300, name
            assert len(set(image.convert("RGB").getdata())) > 50, name  # drawn, not blank
    names = CUBDataset(trained.root, split="test").class_names
    per_class = report["per_class"]
    assert list(per_class) == names
    assert sum(row["num_images"] for row in per_class.values()) == report["num_images"]
    worst = min(names, key=lambda n: (per_class[n]["gradcam"]["max_box_acc"], n))
    md = (out / "metrics.md").read_text()
    assert "Per class, worst first by GradCAM MaxBoxAccV2" in md
    first_row = md.split("Per class", 1)[1].splitlines()[4]
    assert first_row.startswith(f"| {worst} | {per_class[worst]['num_images']} |"), first_row
    # a class's scores are the accumulator's over that class's images alone: the counts add up to the split's
    box = report["methods"]["gradcam"]["box_acc_iou50"] * report["num_images"]
    assert box <= sum(row["gradcam"]["box_acc_iou50"] * row["num_images"] for row in per_class.values()) + 1e-6


def test_wandb_gets_the_table_and_the_plots(trained: Trained, tmp_path: Path, monkeypatch) -> None:
    from wandb_records import finished_log, history_rows, read_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    extra = ("--faithfulness", "--steps", "2", "--road-percentiles", "none", "--limit", "8", "--sanity", "1")
    report, _ = run(trained.classifier, tmp_path, *extra, "--wandb", "t")
    log = finished_log(next((tmp_path / "wandb").glob("offline-run-*")))
    rows = history_rows(log)
    assert len(rows) == 1
    row = rows[0]
    assert row["evaluate/metrics"]["_type"] == "table-file" and row["evaluate/metrics"]["ncols"] > 10
    for name in ("box_accuracy", "deletion_insertion", "sanity", "sanity_maps"):
        assert row[f"evaluate/{name}"]["_type"] == "image-file", row.keys()
    # the report's tables and plots as an HTML panel: its plots inlined (W&B uploads the HTML alone), no gallery
    assert row["evaluate/report"]["_type"] == "html-file"
    html = next((tmp_path / "wandb").glob("offline-run-*/files/" + row["evaluate/report"]["path"])).read_text()
    assert html.count("data:image/png;base64,") == 4 and "report_files/" not in html
    assert report["methods"]["gradcam"]["deletion_auc"] is not None
    summary = {
        item.key: json.loads(item.value_json)
        for record in read_records(log)
        if record.WhichOneof("record_type") == "summary"
        for item in record.summary.update
    }
    final = report["sanity"]["cascade"]["gradcam"]["spearman"][-1]
    assert summary["sanity/gradcam/rank_correlation"] == pytest.approx(final)
    assert summary["gradcam/deletion_auc"] == pytest.approx(report["methods"]["gradcam"]["deletion_auc"])


@pytest.mark.parametrize("kind", ["classifier", "embedding"])
def test_sanity_check_of_a_trained_checkpoint(trained: Trained, tmp_path: Path, kind: str) -> None:
    """``--sanity 2``: the cascade from the head down over the checkpoint's blocks, GradCAM (EmbeddingCAM against
    the trained proxies) passing, the edge baseline untouched, and the section, plot and maps figure written."""
    from PIL import Image

    report, _ = run(getattr(trained, kind), tmp_path, "--sanity", "2", "--limit", "2")
    sanity = report["sanity"]
    method = "gradcam" if kind == "classifier" else "gradcam/normalized_mean"
    assert sanity["num_images"] == 2 and sanity["level"] == SANITY_LEVEL
    assert sanity["blocks"][0] == "net.fc" and sanity["blocks"][-1] == "net.backbone.conv1", sanity["blocks"]
    assert sanity["blocks"][1] == "net.backbone.layer4.1"
    cascade = sanity["cascade"]
    assert set(cascade) == {*report["methods"]} - {"centre_gaussian"} | {"edge", "random"}
    assert all(len(curve["spearman"]) == len(sanity["blocks"]) for curve in cascade.values())
    assert cascade["edge"]["spearman"] == pytest.approx([1.0] * len(sanity["blocks"]))
    assert cascade[method]["spearman"][-1] < SANITY_LEVEL and sanity["failed"] == []
    table = (tmp_path / "metrics.md").read_text()
    assert "## Sanity check" in table and "| passes |" in table and "| baseline |" in table
    for name in ("sanity.png", "sanity_maps.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 600, name


def test_sanity_alone_takes_its_default_number_of_images() -> None:
    from cubcam.train.inspection.evaluate import SANITY_IMAGES, parse_args

    assert parse_args(["x.ckpt", "--sanity"]).sanity == SANITY_IMAGES == 8
    assert parse_args(["x.ckpt", "--sanity", "3"]).sanity == 3 and parse_args(["x.ckpt"]).sanity is None


def test_ctrl_c_exits_130_with_one_line_and_writes_nothing_half(
    trained: Trained, tmp_path: Path, monkeypatch, capsys
) -> None:
    import cubcam.train.inspection.evaluate as evaluate_module
    from cubcam.train.cli import run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "score_split", interrupted)
    with pytest.raises(SystemExit) as exited:
        run(["evaluate", str(trained.classifier), "--out", str(tmp_path / "out"), "--num-workers", "0"])
    assert exited.value.code == 130 and not (tmp_path / "out" / "metrics.json").exists()
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr == ["interrupted: cubcam evaluate stopped; every file it wrote is whole"]
