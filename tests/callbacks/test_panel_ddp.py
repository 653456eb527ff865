"""CAMPanel under DDP (two CPU processes, gloo): one panel per epoch from rank zero, metrics over all ranks.

Run as a script (``python tests/callbacks/test_panel_ddp.py ddp OUT ROOT PATH``) it is the DDP training the test
launches: Lightning re-runs this same command line for rank 1."""

from __future__ import annotations

import cubcam.cams  # noqa: F401  (the torchvision guard: before anything imports torchvision)

# isort: split

import json
import os
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from cli_runs import run_python
from panel_runs import LAYER, SIZE, data_for, finished_run, module_for, panel_indices, trainer_for, wandb_logger
from wandb_records import finished_log, history_rows

from cubcam.callbacks import CAMPanel
from cubcam.callbacks.epoch_maps import METRIC_KEYS
from cubcam.callbacks.sinks import PANEL_KEY
from cubcam.cams import GradCAM, localization
from cubcam.cams.protocol import head_cams
from cubcam.cams.targets import ClassLogits
from cubcam.train.data.synthetic import make_synthetic_cub
from cubcam.train.modules import Classifier

# These tests validate on the test split on purpose (val_fraction=0: every image of a tiny CUB counts).
pytestmark = pytest.mark.filterwarnings("ignore:val_fraction is 0:cubcam.CubcamWarning")


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


# The layer path only: its rows and the protocol's meet in the same gather and merge, and the protocol's metrics under
# DDP are checked through cubcam fit (tests/train/test_train.py).
@pytest.mark.parametrize("path", ["layer"])
def test_ddp_logs_one_panel_per_epoch_and_metrics_over_all_ranks(tmp_path, path):
    # 15 validation images: DistributedSampler pads rank 1 with a repeat of image 0, which must count once.
    root = make_synthetic_cub(tmp_path / "cub", classes=3, per_class=10, size=SIZE, seed=1).parent
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONPATH": str(Path(__file__).parents[1]),  # panel_runs and wandb_records; not the checkout
    }  # the installed cubcam only, never the checkout
    run_python([str(Path(__file__).resolve()), "ddp", str(tmp_path), str(root), path], tmp_path, env)
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


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "ddp":
    ddp_main(sys.argv[2], sys.argv[3], sys.argv[4])
