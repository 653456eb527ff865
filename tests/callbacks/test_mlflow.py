"""MLflow through ``configs/trainer/mlflow.yaml``: the panel per epoch at its step, the bird table per epoch, the
evolution at the end, read back with ``MlflowClient`` from the sqlite store the config names."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from cli_runs import REPO, SIZE

from cubcam.callbacks.sinks import PANEL_KEY
from cubcam.train.cli import main

BIRDS = 8  # the panel: the whole held-out split of the tiny set (4 classes x 2)
mlflow = pytest.importorskip("mlflow")  # the dev extra has it; cubcam[mlflow] for users


def artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for entry in client.list_artifacts(run_id, path):
        found += artifacts(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return found


def test_mlflow_gets_the_panel_at_each_epochs_step_the_tables_and_the_evolution(tiny_cub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's store and artifact folder are relative: runs/...
    monkeypatch.setattr(sys, "argv", ["cubcam"])
    configs = [f"--config={REPO / 'configs' / name}" for name in ("demo/classifier.yaml", "trainer/mlflow.yaml")]
    data = ["--data.root", str(tiny_cub), "--data.image_size", str(SIZE), "--data.batch_size", "8"]
    main(["fit", *configs, *data, "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"])
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cubcam").experiment_id])
    run_id = run.info.run_id
    files = artifacts(client, run_id)

    panels = sorted(f for f in files if f.startswith(f"images/{PANEL_KEY.replace('/', '~')}+") and f.endswith(".png"))
    steps = [int(re.search(r"\+step\+(\d+)\+", name).group(1)) for name in panels]
    val_steps = [m.step for m in client.get_metric_history(run_id, "val/acc")]
    assert sorted(steps) == sorted(val_steps) and len(steps) == 2  # each epoch's panel at its val/* step
    assert len(client.get_metric_history(run_id, "val/cam_max_box_acc")) == 2

    for epoch in (0, 1):
        table = json.loads(Path(client.download_artifacts(run_id, f"cam_table/epoch_{epoch:03d}.json")).read_text())
        rows = [dict(zip(table["columns"], row)) for row in table["data"]]
        assert len(rows) == BIRDS and {row["epoch"] for row in rows} == {epoch}
        assert all(0 <= row["cam_box_iou"] <= 1 for row in rows)
    evolution = [f for f in files if f.startswith("cam_evolution/")]
    assert "cam_evolution/evolution.gif" in evolution and len(evolution) == 1 + BIRDS
    assert not (tmp_path / "mlruns").exists()  # the artifact location is the config's
    assert list((tmp_path / "runs" / "mlflow-artifacts").rglob("*.gif"))
    assert list((tmp_path / "runs" / "mlflow").glob(f"*/{run_id}/checkpoints/last.ckpt"))
