"""The demo from a wheel: built from this checkout, installed (without its dependencies, which come from the test's
own environment through a ``.pth`` file) into a fresh venv, and run in a folder outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from cli_runs import REPO


def run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": ""}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
    return done


TOP_LEVEL_IGNORED = {".venv", ".git", "build", "runs", "data", "wandb", ".pytest_cache", "cubcam.egg-info"}


def ignored(folder: str, names: list[str]) -> list[str]:
    """What the copy leaves out: the checkout's own environment and outputs (top level), and caches."""
    return [n for n in names if (Path(folder) == REPO and n in TOP_LEVEL_IGNORED) or n == "__pycache__"]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy: building in the checkout would leave build/ and egg-info there
    shutil.copytree(REPO, source, ignore=ignored)
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "dist", "./source"],
        work,
    )
    (wheel,) = (work / "dist").glob("cubcam-*.whl")
    run([sys.executable, "-m", "venv", "--without-pip", "venv"], work)
    purelib = Path(sysconfig.get_paths(vars={"base": str(work / "venv"), "platbase": str(work / "venv")})["purelib"])
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co, not cubcam
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(work / "venv" / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        work,
    )
    return work / "venv"


def test_the_demo_and_the_packaged_configs_run_from_a_wheel(wheel_venv: Path, tiny_cub: Path, tmp_path: Path):
    cubcam = str(wheel_venv / "bin" / "cubcam")
    where = run([str(wheel_venv / "bin" / "python"), "-P", "-c", "import cubcam; print(cubcam.__file__)"], tmp_path)
    assert where.stdout.strip().startswith(str(wheel_venv))  # the wheel's cubcam, not the checkout's

    copied = run([cubcam, "configs", "mine"], tmp_path)
    assert "wrote 10 config files to mine" in copied.stdout
    assert (tmp_path / "mine" / "demo" / "classifier.yaml").is_file() and (tmp_path / "mine" / "shared").is_dir()
    # A packaged config by its name, with no such file here (the copies are under mine/).
    printed = run([cubcam, "fit", "--config", "demo/classifier.yaml", "--print_config"], tmp_path)
    assert "class_path: cubcam.train.modules.Classifier" in printed.stdout

    small = ["--data.image_size", "64", "--data.batch_size", "8", "--trainer.max_epochs", "1"]
    demo = run(
        [cubcam, "demo", "--data", str(tiny_cub.parent), *small, "--trainer.enable_progress_bar", "false"], tmp_path
    )
    assert demo.stdout.count("best checkpoint: runs/cubcam/") == 2, demo.stdout[-2000:]
    assert "cubcam explain runs/cubcam/" in demo.stdout
    assert len(list((tmp_path / "runs" / "wandb").glob("offline-run-*"))) == 2
    assert len(list((tmp_path / "runs" / "cubcam").glob("*/checkpoints/last.ckpt"))) == 2
