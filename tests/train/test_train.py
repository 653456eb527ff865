"""End to end through ``cubcam fit`` and the demo configs on a tiny synthetic CUB: both models learn, resume at the
right epoch, reload without the CLI and report the metrics they log; Lightning DDP (2 CPU processes, gloo) gives
each rank its own m-per-class batches."""

from __future__ import annotations

import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import wandb
from cli_runs import (
    BATCH,
    SIZE,
    M,
    assert_logged_every_epoch,
    fit_args,
    only,
    read_record,
    run_python,
    split_outputs,
)
from wandb_records import history_rows

from cubcam.train.cli import main
from cubcam.train.data.datamodule import CUBDataModule
from cubcam.train.data.synthetic import make_synthetic_cub
from cubcam.train.inspection.checkpoint import CheckpointError, load_checkpoint
from cubcam.train.inspection.evaluate import main as evaluate_main
from cubcam.train.modules import Classifier, CUBModule, EmbeddingNet


@pytest.mark.slow
def test_classifier_learns_resumes_at_the_next_epoch_and_reloads(tiny_cub: Path, offline: Path) -> None:
    epochs = 6
    main(fit_args(["demo/classifier.yaml"], tiny_cub, offline, "first", "--trainer.max_epochs", str(epochs)))
    first = read_record(offline / "first")
    assert first["epochs"] == list(range(epochs))
    chance = 1 / 4
    assert first["metrics"]["val/acc"] >= chance + 0.35, first["metrics"]  # 4 classes: chance is 0.25

    last = only(list((offline / "runs" / "cubcam").glob("*/checkpoints/last.ckpt")))
    wandb.teardown()  # the W&B service writes the finished run's log asynchronously; shutting it down flushes it
    run_file = only(list((offline / "runs" / "wandb").glob("offline-run-*/run-*.wandb")))
    assert_logged_every_epoch(run_file, epochs, "val/acc")

    # Reload without the CLI: the logged val/acc is the accuracy of these weights on the validation split.
    module = CUBModule.load_from_checkpoint(last)  # the CLI stored the class path: any module class can load it
    assert type(module) is Classifier and module.hparams.pretrained is False
    assert module.class_names == CUBDataModule(root=str(tiny_cub)).class_names
    logits, labels = split_outputs(last)
    assert len(labels) == 4 * 2  # the demo holds out 20% of each class's 8 training images: round(1.6) = 2
    assert (logits.argmax(1) == labels).float().mean().item() == pytest.approx(first["metrics"]["val/acc"], abs=1e-6)

    # The best checkpoint is the epoch of the highest val/acc, and the test split is scored once, with it, at the end.
    rows = history_rows(run_file)
    val_acc = {row["epoch"]: row["val/acc"] for row in rows if "val/acc" in row}
    best_epoch = max(val_acc, key=lambda epoch: (val_acc[epoch], -epoch))
    best = only(list(last.parent.glob("best-epoch=*.ckpt")))
    assert best.name == f"best-epoch={best_epoch}.ckpt", val_acc
    tested = [row for row in rows if "test/acc" in row]
    assert len(tested) == 1 and "test/loss" in tested[0]
    logits, labels = split_outputs(best, "test")
    assert len(labels) == 4 * 8
    assert tested[0]["test/acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item(), abs=1e-6)

    main(
        fit_args(
            ["demo/classifier.yaml"],
            tiny_cub,
            offline,
            "resumed",
            "--trainer.max_epochs",
            str(epochs + 1),
            "--ckpt_path",
            str(last),
        )
    )
    assert read_record(offline / "resumed")["epochs"] == [epochs]  # only the missing epoch ran
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["epoch"] == epochs  # a second run's config save did not fail either
    # CAMPanel's state key names every option that tells two panels apart; the ModelCheckpoints' keys are those
    # written before BestCheckpoint and the namespace existed, so older runs resume their best score.
    panel_key = (
        "CAMPanel{'num_images': 16, 'method': 'gradcam', 'kind': 'auto', 'proxy': 'normalized_mean', "
        "'target': 'true', 'target_layer': None}"
    )
    assert sorted(checkpoint["callbacks"]) == sorted(
        [
            panel_key,
            "ModelCheckpoint{'monitor': 'val/acc', 'mode': 'max', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
            "'train_time_interval': None}",
            "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
            "'train_time_interval': None}",
        ]
    )
    assert set(checkpoint["callbacks"][panel_key]) == {"panel", "subset", "evolution"}
    assert len(list(last.parent.glob("best-epoch=*.ckpt"))) == 1  # BestCheckpoint, by the module's val/acc

    # fit --ckpt_path resumes it with the same birds and every epoch's thumbnails; explain/evaluate load it.
    old_state = checkpoint["callbacks"][panel_key]
    main(
        fit_args(
            ["demo/classifier.yaml"],
            tiny_cub,
            offline,
            "again",
            "--trainer.max_epochs",
            str(epochs + 2),
            "--ckpt_path",
            str(last),
        )
    )
    newest = max((offline / "runs").rglob("last.ckpt"), key=lambda path: path.stat().st_mtime)
    resumed = torch.load(newest, weights_only=True)
    assert resumed["callbacks"][panel_key]["panel"] == old_state["panel"]
    shown = resumed["callbacks"][panel_key]["evolution"]["epochs"]  # every epoch's thumbnails, the last one's too
    assert shown == [*old_state["evolution"]["epochs"], epochs + 1]
    assert read_record(offline / "again")["epochs"] == [epochs + 1]
    assert type(load_checkpoint(last).module) is Classifier
    report = evaluate_main(
        [str(last), "--data.root", str(tiny_cub), "--limit", "8", "--num-workers", "0", "--out", str(offline / "eval")]
    )
    assert report["num_images"] == 8 and report["kind"] == "classifier"
    # A class path cubcam never had (the early top-level train.modules among them) is one line, not a guess.
    checkpoint["hyper_parameters"]["_class_path"] = "train.modules.Classifier"
    foreign = offline / "foreign.ckpt"
    torch.save(checkpoint, foreign)
    with pytest.raises(CheckpointError, match="is a checkpoint of train.modules.Classifier, not of a cubcam"):
        load_checkpoint(foreign)


@pytest.mark.slow
def test_embedding_net_learns_with_m_per_class_batches(tiny_cub: Path, offline: Path) -> None:
    main(
        fit_args(
            ["demo/embedding.yaml"],
            tiny_cub,
            offline,
            "record",
            "--trainer.max_epochs",
            "3",
            "--data.m_per_class",
            str(M),
        )
    )
    record = read_record(offline / "record")
    assert record["epochs"] == [0, 1, 2]
    wandb.teardown()
    run_file = only(list((offline / "runs" / "wandb").glob("offline-run-*/run-*.wandb")))
    assert_logged_every_epoch(run_file, 3, "val/precision_at_1")
    for labels in record["batches"]:
        assert len(labels) == BATCH and set(Counter(labels).values()) == {M}

    # precision@1 by brute force: each validation image's nearest other image by cosine similarity.
    last = only(list((offline / "runs" / "cubcam").glob("*/checkpoints/last.ckpt")))
    assert torch.load(last, weights_only=True)["epoch"] == 2  # the final epoch, even where it is not the best
    assert type(load_checkpoint(last).module) is EmbeddingNet
    embeddings, labels = split_outputs(last)
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-torch.inf)
    precision_at_1 = (labels[similarity.argmax(1)] == labels).float().mean().item()
    assert record["metrics"]["val/precision_at_1"] == pytest.approx(precision_at_1, abs=1e-6)
    same_class = (labels[:, None] == labels[None, :]).sum(1) - 1
    chance = (same_class / (len(labels) - 1)).float().mean().item()  # a random other image shares the class
    assert precision_at_1 > chance + 0.15, (precision_at_1, chance)
    for name in ("val/mean_average_precision_at_r", "val/r_precision"):
        assert 0 < record["metrics"][name] <= 1
    tested = [row for row in history_rows(run_file) if "test/precision_at_1" in row]
    assert len(tested) == 1 and 0 < tested[0]["test/precision_at_1"] <= 1


@pytest.mark.slow
def test_ddp_two_cpu_processes_get_m_per_class_batches(tiny_cub: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),  # cli_runs
    }
    args = fit_args(
        ["demo/embedding.yaml", "trainer/ddp.yaml"],
        tiny_cub,
        tmp_path,
        "record",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.max_epochs",
        "1",
        "--data.m_per_class",
        str(M),
        wandb=False,
    )
    run_python(["-P", "-m", "cubcam.train", *args], tmp_path, env)
    ranks = [read_record(tmp_path / "record", rank) for rank in (0, 1)]
    for record in ranks:
        assert record["epochs"] == [0] and record["batches"]
        for labels in record["batches"]:
            assert len(labels) == BATCH and set(Counter(labels).values()) == {M}
        assert 0 < record["metrics"]["val/precision_at_1"] <= 1
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"])
    assert ranks[0]["batches"] != ranks[1]["batches"]  # each rank draws its own batches
    assert ranks[0]["metrics"]["val/precision_at_1"] == ranks[1]["metrics"]["val/precision_at_1"]
    # The config's CAMPanel on the CAM protocol's path: its metrics, merged over the ranks, are every rank's.
    cam = {key: value for key, value in ranks[0]["metrics"].items() if key.startswith("val/cam_")}
    assert len(cam) == 4 and cam == {key: ranks[1]["metrics"][key] for key in cam}
    assert list((tmp_path / "runs" / "checkpoints").glob("last.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["classifier.yaml", "embedding.yaml"])
def test_real_cub_configs_run_a_step(config: str, tiny_cub: Path, offline: Path) -> None:
    """The full-size configs, unchanged but for the data, the weights (no network here) and a one-batch run. The
    embedding config's zero-shot scheme holds out a tenth of the training classes: it needs more than 4 classes."""
    root = tiny_cub
    if config == "embedding.yaml":
        root = make_synthetic_cub(offline / "wide", classes=10, per_class=4, size=SIZE, seed=0)  # 5 trained, 1 held out
    main(
        fit_args(
            [config],
            root,
            offline,
            "record",
            "--data.download",
            "false",
            "--model.init_args.pretrained",
            "false",
            "--trainer.fast_dev_run",
            "1",
        )
    )
    record = read_record(offline / "record")
    assert record["epochs"] == [0] and len(record["batches"]) == 1
    assert "val/acc" in record["metrics"] or "val/precision_at_1" in record["metrics"]


@pytest.mark.parametrize("tool", ["explain", "evaluate"])
def test_cli_hands_explain_and_evaluate_to_their_modules(tool: str, monkeypatch) -> None:
    calls = []
    fake = type(sys)(f"cubcam.train.inspection.{tool}")
    fake.main = calls.append
    monkeypatch.setitem(sys.modules, f"cubcam.train.inspection.{tool}", fake)
    main([tool, "--checkpoint", "x.ckpt", "--out", "y"])
    assert calls == [["--checkpoint", "x.ckpt", "--out", "y"]]


def test_cubcam_help_is_lightning_s_help_without_its_args_warning(monkeypatch, capsys) -> None:
    """The console script hands LightningCLI the command line as ``args`` (packaged config names resolved), which
    Lightning warned about, with the whole argv, at the top of every command and of ``cubcam --help``."""
    monkeypatch.setattr(sys, "argv", ["cubcam", "fit", "--help"])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as done:
        warnings.simplefilter("always")
        main(None)
    assert done.value.code == 0
    out = capsys.readouterr()
    assert "--trainer.max_epochs" in out.out and "args parameter" not in out.out + out.err
    assert not [w for w in caught if "args parameter" in str(w.message)]


def test_the_same_seed_gives_the_same_numbers(tiny_cub: Path, offline: Path) -> None:
    """The demo's promise: run it again, get the same figures (seeded weights, batches and workers, deterministic
    algorithms)."""
    for record in ("first", "second"):
        main(
            fit_args(
                ["demo/classifier.yaml"], tiny_cub, offline / record, record, "--trainer.max_epochs", "2", wandb=False
            )
        )
    first, second = (read_record(offline / r / r) for r in ("first", "second"))
    assert first["batches"] == second["batches"]
    assert first["metrics"] == second["metrics"] and "val/cam_max_box_acc" in first["metrics"]


def test_a_packaged_config_is_found_by_name_after_either_flag(offline: Path, capsys) -> None:
    """In a folder without cubcam's configs, ``--config NAME`` and ``-c NAME`` both find the packaged file."""
    for flag in ("--config", "-c"):
        with pytest.raises(SystemExit) as exited:
            main(["fit", flag, "demo/classifier.yaml", "--print_config"])
        assert exited.value.code in (0, None)
        assert "class_path: cubcam.train.modules.Classifier" in capsys.readouterr().out
