"""``cubcam demo`` and ``cubcam configs DIR``: what ``./demo.sh`` does, from an installed wheel as from a clone.

    cubcam demo                                  # synthetic CUB-format data, both demo models, W&B offline
    CUB_ROOT=/data/cub cubcam demo               # real CUB-200-2011: the full-size configs (GPU work)
    cubcam demo --trainer.max_epochs 2           # extra arguments go to both `cubcam fit` calls
    cubcam configs my-configs/                   # copy the packaged configs to a folder, to edit

The configs ship inside the package (``cubcam.configs``, the repository's ``configs/`` folder), so ``cubcam fit
--config demo/classifier.yaml`` finds them by that name where no such file exists in the working folder
(``cubcam.train.packaged.packaged_configs``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from cubcam.train.cli import run
from cubcam.train.data.synthetic import make_synthetic_cub
from cubcam.train.packaged import config_root

DEMO = ("demo/classifier.yaml", "demo/embedding.yaml")  # the CPU demo: ResNet-18s on the synthetic set
FULL = ("classifier.yaml", "embedding.yaml")  # the real configs: ResNet-50, ImageNet weights, 224 px
SYNTHETIC = {"classes": 8, "per_class": 40, "size": 128, "seed": 0}  # what the demo configs are written for


def copy_configs(folder: Path) -> list[Path]:
    """The packaged configs copied into ``folder`` (its layout kept: a model file names ``../shared/...``);
    files already there are left as they are. Returns the files written."""
    written = []
    for source in sorted(config_root().rglob("*.yaml")):
        target = folder / source.relative_to(config_root())
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            written.append(target)
    return written


def configs_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="cubcam configs", description="copy cubcam's configs to a folder, to edit")
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    written = copy_configs(args.folder)
    kept = len(list(config_root().rglob("*.yaml"))) - len(written)
    print(f"wrote {len(written)} config files to {args.folder}" + (f" ({kept} already there, kept)" if kept else ""))
    print(f"train with: cubcam fit --config {args.folder / DEMO[0]}")


def main(argv: list[str] | None = None) -> None:
    """``cubcam demo [--data DIR] [--cub-root DIR] [fit arguments...]``."""

    parser = argparse.ArgumentParser(
        prog="cubcam demo", description=__doc__.split("\n\n")[0], epilog="other arguments go to both `cubcam fit`s"
    )
    parser.add_argument("--data", type=Path, default=Path("data/synthetic_cub"), help="the synthetic set's folder")
    parser.add_argument("--cub-root", type=Path, default=os.environ.get("CUB_ROOT") or None, help="real CUB")
    args, fit_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_MODE", "offline")  # nothing leaves the machine; `wandb sync` uploads later
    os.environ.setdefault("WANDB_SILENT", "true")
    if args.cub_root is not None:
        configs, data = FULL, ["--data.root", str(args.cub_root), "--data.download", "false"]
        print(f"== using CUB-200-2011 at {args.cub_root} with the full-size configs")
    else:
        configs, data = DEMO, ["--data.root", str(args.data)]
        if not (args.data / "CUB_200_2011" / "images.txt").is_file():
            print(f"== writing the synthetic CUB dataset to {args.data}")
            make_synthetic_cub(args.data, **SYNTHETIC)
    best = {}
    for config in configs:
        print(f"== cubcam fit --config {config}", flush=True)
        start = time.monotonic()
        cli = run(["fit", "--config", str(config_root() / config), *data, *fit_args])
        best[config] = getattr(cli, "best_checkpoint", "")
        print(f"== {config} done in {time.monotonic() - start:.0f} s", flush=True)
    print("\n== results (each run's W&B folder and `wandb sync` command are printed above)")
    for config, path in best.items():
        print(f"   {config:<22} best checkpoint: {path or '-'}")
    classifier = best.get(configs[0])
    if classifier:
        cubcam = sys.argv[0] if Path(sys.argv[0]).name == "cubcam" else "cubcam"  # as it was called: .venv/bin/...
        print(f"look at what it learned:  {cubcam} explain {classifier} --split val --out panel/")
        print(f"                          {cubcam} evaluate {classifier} --out eval/")
