"""``cubcam explain`` on tiny checkpoints trained on synthetic CUB: files, overlay sizes and pixels (against the CAM
engine run directly), odd image modes, bad inputs beside good ones, wrong checkpoints, and retrieval neighbours
against a brute-force cosine search."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from crafted import png_header
from PIL import Image
from trained_checkpoints import SIZE, Trained

import cubcam.train.inspection.reference
from cubcam.cams import EmbeddingCAM, GradCAM, normalized_mean_proxies, overlay
from cubcam.cams.overlay import denormalize
from cubcam.train.data.cub import CUBDataset
from cubcam.train.data.presets import EvalPreset, load_rgb
from cubcam.train.inspection.checkpoint import load_checkpoint
from cubcam.train.inspection.explain import main
from cubcam.train.inspection.reference import reference_set

# These tests validate on the test split on purpose (val_fraction=0: every image of a tiny CUB counts).
pytestmark = pytest.mark.filterwarnings("ignore:val_fraction is 0:cubcam.CubcamWarning")


def preset_image(path: Path) -> torch.Tensor:
    """What the model sees of an image file: the evaluation preset's centre crop, normalised."""
    pil = load_rgb(path)
    return EvalPreset(SIZE)(pil, torch.tensor([0.0, 0.0, *pil.size]), torch.zeros(15, 3))[0]


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def embeddings_of(module: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(module(images), dim=1)


def test_user_images_of_any_size_and_mode_beside_bad_ones(trained: Trained, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    wide = tmp_path / "wide.jpg"
    Image.fromarray(rng.integers(0, 255, (70, 130, 3), dtype=np.uint8)).save(wide)
    gray = tmp_path / "gray.png"
    Image.fromarray(rng.integers(0, 255, (90, 50), dtype=np.uint8), mode="L").save(gray)
    rgba = rng.integers(0, 255, (120, 80, 4), dtype=np.uint8)
    rgba[:, :40, 3] = 0  # left half transparent: composited on white, not on the hidden colours
    alpha = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(alpha)
    missing, broken, bomb = tmp_path / "missing.jpg", tmp_path / "broken.jpg", tmp_path / "huge.png"
    broken.write_text("not an image")
    bomb.write_bytes(png_header(20000, 20000))  # 400 Mpx: over twice Pillow's MAX_IMAGE_PIXELS, never allocated
    out = tmp_path / "out"

    with pytest.raises(SystemExit) as exited:
        main(
            [
                str(trained.classifier),
                str(wide),
                str(missing),
                str(gray),
                str(broken),
                str(bomb),
                str(alpha),
                "--out",
                str(out),
            ]
        )
    assert exited.value.code == 1  # some images failed

    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 3 and str(missing) in errors[0] and str(broken) in errors[1], errors
    assert str(bomb) in errors[2] and "decompression" in errors[2].lower(), errors
    summary = json.loads((out / "summary.json").read_text())
    assert [e["source"] for e in summary["errors"]] == [str(missing), str(broken), str(bomb)]
    assert [r["source"] for r in summary["images"]] == [str(wide), str(gray), str(alpha)]
    assert summary["kind"] == "classifier" and summary["method"] == "gradcam" and summary["image_size"] == [SIZE, SIZE]

    module = load_checkpoint(trained.classifier).module
    for path, record in zip([wide, gray, alpha], summary["images"]):
        written = read_png(out / record["overlay"])
        assert written.shape == (SIZE, SIZE, 3)  # the preset's crop, whatever the input's size
        image = preset_image(path)
        logits = module(image[None]).detach()
        assert record["target"] == {
            "kind": "predicted",
            "class": int(logits.argmax()),
            "name": module.class_names[int(logits.argmax())],
        }  # no label: predicted class
        expected = overlay(denormalize(image), GradCAM(module, module.cam_target_layer)(image[None])[0])
        assert np.abs(written.astype(int) - expected).max() <= 1
    grid = read_png(out / "grid.png")
    assert grid.shape[0] > SIZE and grid.shape[1] >= 3 * SIZE  # three captioned tiles


# (ScoreCAM's route through the whole module is the one evaluate takes: tests/train/test_evaluate.py)
@pytest.mark.parametrize("method", ["gradcam++", "layercam"])
def test_method_option_explains_with_that_method(trained: Trained, tmp_path: Path, method: str) -> None:
    path = tmp_path / "bird.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (100, 100, 3), dtype=np.uint8)).save(path)
    main([str(trained.classifier), str(path), "--method", method, "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["method"] == method
    module = load_checkpoint(trained.classifier).module
    image = preset_image(path)
    expected = overlay(denormalize(image), GradCAM(module, module.cam_target_layer, method=method)(image[None])[0])
    other = overlay(denormalize(image), GradCAM(module, module.cam_target_layer)(image[None])[0])
    written = read_png(tmp_path / "out" / summary["images"][0]["overlay"]).astype(int)
    assert np.abs(written - expected).max() <= 1
    assert np.abs(written - other).max() > 1  # not the plain GradCAM map


def test_dataset_panel_of_an_embedding_net_and_its_reference_cache(
    trained: Trained, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "panel"
    main([str(trained.embedding), "--split", "test", "--num", "5", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "embedding" and summary["proxy"] == "normalized_mean" and not summary["errors"]
    records = summary["images"]
    assert len(records) == 5 and len({r["true"]["class"] for r in records}) > 1  # spread over several classes

    # Overlays equal EmbeddingCAM run directly with the true class's Normalized Mean Proxy of the train split.
    module = load_checkpoint(trained.embedding).module
    train_split = CUBDataset(trained.root, split="train", transform=EvalPreset(SIZE))
    test_split = CUBDataset(trained.root, split="test", transform=EvalPreset(SIZE))
    gallery = embeddings_of(module, torch.stack([s["image"] for s in train_split]))
    proxies = normalized_mean_proxies(gallery, torch.tensor(train_split.labels))
    images = torch.stack([test_split[r["index"]]["image"] for r in records])
    labels = torch.tensor([test_split[r["index"]]["label"] for r in records])
    assert [r["target"]["class"] for r in records] == labels.tolist()
    assert all(r["target"]["kind"] == "true" for r in records)
    maps = EmbeddingCAM(module, module.cam_target_layer)(images, proxies[labels])
    for record, image, cam in zip(records, images, maps):
        written = read_png(out / record["overlay"])
        assert np.abs(written.astype(int) - overlay(denormalize(image), cam)).max() <= 1

    # The reference embeddings were cached beside the checkpoint; the next run reads them instead of embedding.
    caches = list(trained.embedding.parent.glob(f"{trained.embedding.stem}.reference-train-*.pt"))
    assert len(caches) == 1
    assert torch.allclose(torch.load(caches[0], weights_only=True)["embeddings"], gallery, atol=1e-5)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the cached reference embeddings were not used")

    monkeypatch.setattr(cubcam.train.inspection.reference, "embed", no_second_pass)
    main([str(trained.embedding), "--num", "2", "--proxy", "single_point_random", "--out", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert len(again["images"]) == 2 and again["proxy"] == "single_point_random"
    # The early spelling of the single-point proxies is an error naming today's.
    with pytest.raises(SystemExit) as refused:
        main([str(trained.embedding), "--proxy", "single_point", "--out", str(tmp_path / "old")])
    assert refused.value.code == 2


def test_reference_cache_follows_the_checkpoint_content_and_the_data_setting(trained: Trained, tmp_path: Path) -> None:
    checkpoint = tmp_path / "copy.ckpt"
    shutil.copy(trained.embedding, checkpoint)
    first = reference_set(load_checkpoint(checkpoint).module, checkpoint, trained.root, image_size=SIZE)

    retrained = torch.load(checkpoint, weights_only=True)
    retrained["state_dict"]["net.fc.bias"] += 0.5  # same file name, other weights: the cache must not be reused
    torch.save(retrained, checkpoint)
    module = load_checkpoint(checkpoint).module
    second = reference_set(module, checkpoint, trained.root, image_size=SIZE)
    train_split = CUBDataset(trained.root, split="train", transform=EvalPreset(SIZE))
    expected = embeddings_of(module, torch.stack([s["image"] for s in train_split]))
    assert torch.allclose(second.embeddings, expected, atol=1e-5)
    assert not torch.allclose(first.embeddings, second.embeddings, atol=1e-3)
    assert len(list(tmp_path.glob("copy.reference-train-*.pt"))) == 1  # replaced, not piled up

    reference_set(module, checkpoint, trained.root, image_size=SIZE // 2)  # another data setting: its own cache
    assert len(list(tmp_path.glob("copy.reference-train-*.pt"))) == 2


def test_wandb_run_gets_the_grid_and_overlays(trained: Trained, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "logged"
    main([str(trained.classifier), "--num", "2", "--out", str(out), "--wandb"])
    (run,) = out.glob("wandb/offline-run-*")
    media = run / "files" / "media" / "images" / "explain"  # wandb.Image copies each logged image here
    assert len(list(media.glob("grid_*.png"))) == 1 and len(list(media.glob("overlays_*.png"))) == 2


def test_wandb_without_a_key_logs_offline_from_the_start(trained: Trained, tmp_path: Path, monkeypatch, capsys):
    """Without a key W&B stopped at the end, after the work, to ask for one; now the run is offline at once."""
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.setenv(name, "")  # recorded, so that teardown restores what was there before
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "logged"
    main([str(trained.classifier), "--num", "2", "--out", str(out), "--wandb"])
    assert "--wandb logs offline" in capsys.readouterr().out
    assert len(list(out.glob("wandb/offline-run-*"))) == 1


class NotATensor:
    """Pickled into a checkpoint, it must not be unpickled."""


def other_model(path: Path, trained: Trained) -> list[str]:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"hidden": 3, "dropout": 0.1}}, path)
    return [str(path)]


def foreign_class(path: Path, trained: Trained) -> list[str]:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"_class_path": "zoo.Giraffe"}}, path)
    return [str(path)]


def pickled_object(path: Path, trained: Trained) -> list[str]:
    torch.save({"state_dict": {}, "hyper_parameters": {"arch": "resnet18"}, "extra": NotATensor()}, path)
    return [str(path)]


def weights_of_another_arch(path: Path, trained: Trained) -> list[str]:
    checkpoint = torch.load(trained.classifier, weights_only=True)
    checkpoint["hyper_parameters"]["arch"] = "resnet34"
    torch.save(checkpoint, path)
    return [str(path)]


def corrupt(path: Path, trained: Trained) -> list[str]:
    path.write_bytes(b"PK\x03\x04 truncated")
    return [str(path)]


def web_page(path: Path, trained: Trained) -> list[str]:
    path.write_text("<!DOCTYPE html>\n<html><body>Sign in</body></html>\n")
    return [str(path)]


def empty(path: Path, trained: Trained) -> list[str]:
    path.touch()
    return [str(path)]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path, trained: [str(path)], "does not exist"),
        (corrupt, "is cut short or damaged (a zip archive without its index)"),
        (web_page, "is not a file torch.save wrote: it begins b'<!DOCTYPE html>"),
        (empty, "is empty (0 bytes)"),
        (other_model, "is a checkpoint of another model"),
        (foreign_class, "is a checkpoint of zoo.Giraffe"),
        (pickled_object, "refusing to unpickle"),
        (weights_of_another_arch, "does not load as a Classifier"),
        (lambda path, trained: [str(trained.classifier), "--query", str(path)], "needs an embedding net"),
        pytest.param(
            lambda path, trained: [str(trained.classifier), "--device", "cuda"],
            "--device cuda: this machine has no CUDA device torch can use; pass --device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine explains on cuda"),
        ),
    ],
)
def test_unusable_checkpoints_give_one_clear_line(make, message: str, trained: Trained, tmp_path: Path, capsys) -> None:
    args = make(tmp_path / "model.ckpt", trained)
    with pytest.raises(SystemExit) as exited:
        main([*args, "--num", "1", "--out", str(tmp_path / "out")])
    assert exited.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error:") and message in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_retrieval_neighbours_equal_a_brute_force_cosine_search(trained: Trained, tmp_path: Path) -> None:
    test_split = CUBDataset(trained.root, split="test", transform=EvalPreset(SIZE))
    query = test_split.image_path(3)
    out = tmp_path / "retrieval"
    main([str(trained.embedding), "--query", str(query), "--topk", "5", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())

    module = load_checkpoint(trained.embedding).module
    train_split = CUBDataset(trained.root, split="train", transform=EvalPreset(SIZE))
    gallery = embeddings_of(module, torch.stack([s["image"] for s in train_split]))
    similarity = (embeddings_of(module, preset_image(query)[None]) @ gallery.T)[0]
    expected = similarity.topk(5)
    neighbours = summary["neighbours"]
    assert [n["index"] for n in neighbours] == expected.indices.tolist()
    assert [n["similarity"] for n in neighbours] == pytest.approx(expected.values.tolist(), abs=1e-5)
    assert [n["label"] for n in neighbours] == [train_split.labels[i] for i in expected.indices.tolist()]
    assert neighbours[0]["path"] == str(train_split.image_path(neighbours[0]["index"]))
    grid = read_png(out / "retrieval.png")
    assert grid.shape[1] >= 2 * SIZE and grid.shape[0] >= 5 * SIZE  # five rows of (query, neighbour) pairs


def test_many_images_stream_into_sorted_names_and_grid_pages(trained: Trained, tmp_path: Path, monkeypatch) -> None:
    """explain held every image and tile in memory and drew one grid (916 x 36,879 px for 500 images): now images
    are read a batch at a time, overlays are written as they are made, and the grid is paged."""
    import cubcam.train.inspection.explain as explain_module
    import cubcam.train.inspection.explain_output as output_module

    images = []
    for k in range(101):  # past 99: the names still sort in order
        path = tmp_path / f"bird{k}.png"
        Image.fromarray(np.full((SIZE, SIZE, 3), 2 * k, dtype=np.uint8)).save(path)
        images.append(path)
    events: list[str] = []
    tiles_per_page: list[int] = []
    load, save, page = explain_module.load_user_image, explain_module.save_png, output_module.grid
    monkeypatch.setattr(explain_module, "load_user_image", lambda *a: events.append("load") or load(*a))
    monkeypatch.setattr(explain_module, "save_png", lambda *a, **k: events.append("save") or save(*a, **k))
    monkeypatch.setattr(
        output_module, "grid", lambda tiles, *a, **k: tiles_per_page.append(len(tiles)) or page(tiles, *a, **k)
    )
    out = tmp_path / "out"
    main([str(trained.classifier), *map(str, images), "--out", str(out), "--batch-size", "16"])

    summary = json.loads((out / "summary.json").read_text())
    names = [record["overlay"] for record in summary["images"]]
    assert names == sorted(names) and names[0] == "000_bird0.png" and names[100] == "100_bird100.png"
    assert summary["grids"] == ["grid_1.png", "grid_2.png"] and tiles_per_page == [64, 37]
    assert events.index("save") < events.index("load", 16)  # the first batch is written before the second is read
    heights = [read_png(out / name).shape[0] for name in summary["grids"]]
    assert heights[0] / heights[1] == pytest.approx(16 / 10, rel=0.05)  # 16 rows of 4 tiles, then 10


@pytest.mark.parametrize(("tool", "option"), [("explain", "--num"), ("explain", "--topk"), ("evaluate", "--limit")])
def test_zero_counts_are_refused_in_one_line(tool: str, option: str, trained: Trained, tmp_path: Path, capsys) -> None:
    from cubcam.train.inspection.evaluate import main as evaluate_main

    run = main if tool == "explain" else evaluate_main
    with pytest.raises(SystemExit) as exited:
        run([str(trained.classifier), option, "0", "--out", str(tmp_path)])
    assert exited.value.code == 2
    assert f"argument {option}: must be 1 or more, got 0" in capsys.readouterr().err


def test_a_full_disk_ends_explain_and_evaluate_in_one_line(trained: Trained, tmp_path: Path, monkeypatch, capsys):
    import errno
    import tempfile

    from cubcam.train.inspection.evaluate import main as evaluate_main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full)  # where cubcam.cams.files starts every write
    for run, extra in ((main, ["--num", "2"]), (evaluate_main, ["--limit", "2"])):
        with pytest.raises(SystemExit) as exited:
            run([str(trained.classifier), *extra, "--num-workers", "0", "--out", str(tmp_path / "out")])
        assert exited.value.code == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert line.startswith(f"error: could not write {tmp_path / 'out'}/") and "No space left on device (" in line


def test_ctrl_c_writes_what_is_explained_and_exits_130_with_one_line(
    trained: Trained, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Ctrl-C in the second batch: the first batch's overlays, their summary.json (marked interrupted) and the grid
    are written, and ``cubcam explain`` exits 130 with one line, no traceback."""
    import cubcam.train.inspection.explain as explain_module
    from cubcam.train.cli import run

    images = []
    for k in range(6):
        images.append(tmp_path / f"bird{k}.png")
        Image.fromarray(np.full((SIZE, SIZE, 3), 40 * k, dtype=np.uint8)).save(images[-1])
    explain = explain_module.ImageExplainer.__call__
    calls = []

    def interrupted(self, items):
        calls.append(len(items))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return explain(self, items)

    monkeypatch.setattr(explain_module.ImageExplainer, "__call__", interrupted)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        run(["explain", str(trained.classifier), *map(str, images), "--out", str(out), "--batch-size", "4"])
    assert exited.value.code == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and len(summary["images"]) == 4 and (out / "grid.png").is_file()
    assert sorted(p.name for p in out.glob("0*.png")) == [record["overlay"] for record in summary["images"]]
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr == [f"interrupted: explained 4 of 6 image(s) into {out} (summary.json and the grid hold them)"]
