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
from trained_checkpoints import SIZE, Trained, trained_checkpoints

from cubcam.cams import EmbeddingCAM, GradCAM, normalized_mean_proxies
from cubcam.cams.localization import heatmap_ratio, max_box_acc, pointing_game
from cubcam.train.checkpoint import load_checkpoint
from cubcam.train.data.cub import CUBDataset
from cubcam.train.data.presets import EvalPreset
from cubcam.train.evaluate import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    return trained_checkpoints(tmp_path_factory)


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
    scores["heatmap_ratio"] = float(np.mean(heatmap_ratio(maps, split["box"])))
    scores["pointing_game"] = float(np.mean(pointing_game(maps, boxes=split["box"])))  # the callback's meaning
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
    assert report["num_images"] == len(test_split["label"]) and report["method"] == "gradcam"
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
    assert set(report["methods"]) == {"gradcam/normalized_mean", "gradcam/single_point", "centre_gaussian"}
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
        "gradcam/single_point": gallery[picks],
    }
    cam = EmbeddingCAM(module, module.cam_target_layer)
    for name, proxy in proxies.items():
        maps = batched(cam, test_split["image"], proxy[test_split["label"]])
        assert_scores(report["methods"][name], expected_scores(maps, test_split))


def test_weightings_are_scored_side_by_side(trained: Trained, tmp_path: Path, test_split) -> None:
    """--weightings a,b: one column per weighting (and, for an embedding net, per proxy scheme), each equal to
    cams.localization on the engine's maps of that weighting."""
    report, _ = run(trained.classifier, tmp_path / "classifier", "--weightings", "gradcam,layercam")
    assert set(report["methods"]) == {"gradcam", "layercam", "centre_gaussian"} and report["weightings"] == [
        "gradcam",
        "layercam",
    ]
    module = load_checkpoint(trained.classifier).module
    maps = batched(
        GradCAM(module, module.cam_target_layer, weighting="layercam"), test_split["image"], test_split["label"]
    )
    assert_scores(report["methods"]["layercam"], expected_scores(maps, test_split))
    assert report["methods"]["layercam"] != report["methods"]["gradcam"]
    assert (
        "| metric | GradCAM | LayerCAM | centre Gaussian (baseline) |"
        in (tmp_path / "classifier" / "metrics.md").read_text()
    )

    report, _ = run(trained.embedding, tmp_path / "embedding", "--weightings", "gradcam++")
    assert set(report["methods"]) == {"gradcam++/normalized_mean", "gradcam++/single_point", "centre_gaussian"}
    table = (tmp_path / "embedding" / "metrics.md").read_text()
    assert "EmbeddingCAM, GradCAM++ weighting (normalized mean proxy)" in table
    with pytest.raises(SystemExit):
        main([str(trained.classifier), "--weightings", "gradcam,scorecam"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.root", "{tmp}/nowhere"], "nowhere not found; pass --data.root"),
        (["--data.split_scheme", "zero_shot", "--reference-split", "train"], "only come from the test split"),
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
    from cubcam.callbacks.measure import METRIC_KEYS
    from cubcam.train.data.datamodule import CUBDataModule

    module = load_checkpoint(trained.classifier).module
    data = CUBDataModule(root=str(trained.root), image_size=SIZE, batch_size=BATCH, num_workers=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[CAMPanel(num_images=4)],
    )
    logged = trainer.validate(module, datamodule=data, verbose=False)[0]
    report = classifier_runs[0]["methods"]["gradcam"]
    assert len(data.val_dataset) == classifier_runs[0]["num_images"]  # the subset is the whole split here
    for key, name in METRIC_KEYS.items():
        assert logged[key] == pytest.approx(report[name], abs=1e-6), key
    assert CAMPanel().metrics_subset >= len(data.val_dataset)
