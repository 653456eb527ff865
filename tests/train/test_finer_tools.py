"""Finer-CAM in ``cubcam explain --finer`` and ``cubcam evaluate --finer`` on the tiny trained checkpoints: the rivals
are the classes nearest by the model's own scores, the maps are the engine's FinerCAM, and the most confused pairs
are counted from the model's own predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from trained_checkpoints import SIZE, Trained

from cubcam.cams import FinerCAM, overlay
from cubcam.cams.overlay import denormalize
from cubcam.train.data.cub import CUBDataset, spread_indices
from cubcam.train.data.presets import EvalPreset
from cubcam.train.inspection.checkpoint import load_checkpoint
from cubcam.train.inspection.confusion import confused_pairs
from cubcam.train.inspection.evaluate import main as evaluate
from cubcam.train.inspection.explain import main as explain


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_explain_finer_draws_each_class_against_its_nearest_rivals(trained: Trained, tmp_path: Path) -> None:
    out = tmp_path / "finer"
    explain([str(trained.classifier), "--split", "test", "--num", "4", "--finer", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finer_rivals"] == 3

    module = load_checkpoint(trained.classifier).module
    test = CUBDataset(trained.root, split="test", transform=EvalPreset(SIZE))
    records = summary["images"]
    images = torch.stack([test[r["index"]]["image"] for r in records])
    with torch.no_grad():
        logits = module(images)
    explained = torch.tensor([r["target"]["class"] for r in records])
    maps = FinerCAM(module, module.cam_target_layer)(images, explained)
    for record, row, c, image, cam in zip(records, logits, explained, images, maps):
        nearest = (row - row[c]).abs().argsort()[1:4].tolist()  # the class itself is at distance 0
        assert [rival["class"] for rival in record["finer"]["rivals"]] == nearest
        written = read_png(out / record["finer"]["overlay"])
        assert np.abs(written.astype(int) - overlay(denormalize(image), cam)).max() <= 1
    assert read_png(out / "grid.png").shape[1] >= 4 * SIZE  # each image's two maps side by side, two images a row


def test_explain_query_finer_tells_the_nearest_neighbour_from_the_nearest_of_another_class(
    trained: Trained, tmp_path: Path
) -> None:
    test = CUBDataset(trained.root, split="test", transform=EvalPreset(SIZE))
    out = tmp_path / "retrieval"
    explain([str(trained.embedding), "--query", str(test.image_path(3)), "--finer", "--out", str(out)])
    finer = json.loads((out / "summary.json").read_text())["finer"]

    module = load_checkpoint(trained.embedding).module
    train = CUBDataset(trained.root, split="train", transform=EvalPreset(SIZE))
    with torch.no_grad():
        gallery = F.normalize(module(torch.stack([s["image"] for s in train])), dim=1)
        query = F.normalize(module(test[3]["image"][None]), dim=1)
    order = (query @ gallery.T)[0].argsort(descending=True).tolist()
    other = next(i for i in order if train.labels[i] != train.labels[order[0]])
    assert finer["like"]["index"] == order[0] and finer["rather_than"]["index"] == other
    assert finer["rather_than"]["rank"] == order.index(other) + 1
    assert finer["like"]["name"] != finer["rather_than"]["name"]
    assert read_png(out / "retrieval_finer.png").std() > 0


def test_confused_pairs_count_both_directions_and_keep_the_mistaken_images() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 3, -1])
    predicted = np.array([1, 0, 0, 0, 3, 3, 2, 1])  # 0<->1 three times, 2<->3 three times, -1 unknown: ignored
    pairs = confused_pairs(labels, predicted, count=5)
    assert [(p["classes"], p["count"]) for p in pairs] == [([0, 1], 3), ([2, 3], 3)]
    assert pairs[0]["slots"] == {0: [0], 1: [2, 3]} and pairs[1]["slots"] == {2: [4, 5], 3: [6]}
    assert confused_pairs(labels[:2], labels[:2]) == []


def test_evaluate_finer_scores_each_method_both_ways_and_shows_the_confused_pairs(
    trained: Trained, tmp_path: Path
) -> None:
    for checkpoint, plain in ((trained.classifier, "gradcam"), (trained.embedding, "gradcam/normalized_mean")):
        out = tmp_path / checkpoint.stem
        report = evaluate([str(checkpoint), "--limit", "12", "--finer", "--out", str(out)])
        scores = report["methods"]
        assert set(scores[plain + "+finer"]) == set(scores[plain])  # every metric, the parts' pointing game too
        assert "gradcam/single_point_random+finer" not in scores  # a single point is no class to rank
        assert scores[plain + "+finer"] != scores[plain]
        text = (out / "metrics.md").read_text()
        assert "Finer-" in text and "## Most confused pairs" in text

        module = load_checkpoint(checkpoint).module
        test = CUBDataset(trained.root, split="test", transform=EvalPreset(SIZE))
        slots = spread_indices(len(test), 12)
        images = torch.stack([test[i]["image"] for i in slots])
        labels = np.array([test.labels[i] for i in slots])
        with torch.no_grad():
            outputs = module(images)
        if plain == "gradcam":
            predicted = outputs.argmax(1).numpy()
        else:  # the nearest Normalized Mean Proxy of the train split
            train = CUBDataset(trained.root, split="train", transform=EvalPreset(SIZE))
            with torch.no_grad():
                gallery = F.normalize(module(torch.stack([s["image"] for s in train])), dim=1)
            proxies = torch.stack(
                [F.normalize(gallery[torch.tensor(train.labels) == c].mean(0), dim=0) for c in range(4)]
            )
            predicted = (F.normalize(outputs, dim=1) @ proxies.T).argmax(1).numpy()
        expected = confused_pairs(labels, predicted)
        assert [p["count"] for p in report["confused_pairs"]] == [p["count"] for p in expected]
        for record in report["confused_pairs"]:
            assert read_png(out / record["figure"]).shape[0] >= 2 * SIZE  # one row per class of the pair
