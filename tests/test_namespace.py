"""cubcam installs as one namespace, ``cubcam.*``: a user's own ``callbacks/`` package or ``train.py`` never shadows
it, no top-level ``cams``/``train``/``callbacks`` module is installed, and a wheel holds only ``cubcam/``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def python(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """This interpreter (the one cubcam is installed in) run in ``cwd``, with nothing added to its path."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_no_top_level_modules_are_installed(tmp_path: Path) -> None:
    probe = "import importlib.util as u; print([n for n in ('cams', 'train', 'callbacks') if u.find_spec(n)])"
    done = python(tmp_path, "-P", "-c", probe)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


@pytest.fixture
def users_project(tmp_path: Path, synthetic_cub: Path) -> Path:
    """A Lightning project as users have them: its own callbacks/ package and train.py, next to its script."""
    (tmp_path / "callbacks").mkdir()
    (tmp_path / "callbacks" / "__init__.py").write_text("USERS_OWN = 'callbacks of the user'\n")
    (tmp_path / "train.py").write_text("print('the user train.py ran')\n")
    (tmp_path / "fit.py").write_text(
        textwrap.dedent(f"""
        from cubcam.callbacks import CAMPanel  # first: its torchvision guard (README, environment notes)
        import pytorch_lightning as pl
        from callbacks import USERS_OWN
        from cubcam.train.data.datamodule import CUBDataModule
        from cubcam.train.modules import Classifier

        data = CUBDataModule(root={str(synthetic_cub)!r}, image_size=64, batch_size=8, num_workers=0)
        module = Classifier(num_classes=data.num_classes, class_names=data.class_names, output_stride=16)
        panel = CAMPanel(num_images=2)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False, callbacks=[panel],
                             enable_checkpointing=False, enable_progress_bar=False, default_root_dir="out")
        trainer.fit(module, datamodule=data)
        print(USERS_OWN, "| panel", panel.panel, "| metric", float(trainer.callback_metrics["val/cam_max_box_acc"]))
    """)
    )
    return tmp_path


def test_cubcam_runs_in_a_project_with_its_own_callbacks_and_train(users_project: Path) -> None:
    done = python(users_project, "fit.py")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "callbacks of the user | panel [" in done.stdout
    assert (users_project / "out" / "cam_panels" / "epoch_000.png").is_file()
    cli = python(users_project, "-m", "cubcam.train", "--help")  # not the user's train.py
    assert cli.returncode == 0 and "the user train.py ran" not in cli.stdout
    assert "cubcam explain" in cli.stdout and "cubcam evaluate" in cli.stdout


def test_the_wheel_holds_only_the_cubcam_namespace(tmp_path: Path) -> None:
    done = python(
        tmp_path, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("cubcam-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert packages == {"cubcam"}
    for module in (
        "cubcam/__init__.py",
        "cubcam/py.typed",
        "cubcam/train/inspection/evaluate.py",
        "cubcam/cams/engine.py",
        "cubcam/callbacks/cam_panel.py",
        "cubcam/train/cli.py",
        "cubcam/train/data/cub.py",
    ):
        assert module in names


def test_cubcam_is_a_regular_package_whose_import_runs_the_torchvision_guard(tmp_path: Path) -> None:
    probe = "import sys, cubcam; print(cubcam.__file__ is not None, 'cubcam.cams._torchvision_guard' in sys.modules)"
    done = python(tmp_path, "-P", "-c", probe)
    assert done.returncode == 0 and done.stdout.split() == ["True", "True"], done.stderr
