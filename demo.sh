#!/usr/bin/env bash
# cubcam demo: one command from a fresh clone.
#   1. makes .venv and installs cubcam into it (if .venv is absent);
#   2. runs `cubcam demo`: writes a synthetic CUB-format dataset to data/synthetic_cub (if absent), then trains a
#      ResNet-18 classifier and a triplet embedding net on CPU (configs/demo/*.yaml), logging to W&B offline and
#      keeping checkpoints; each run ends by printing where its checkpoints are and the `wandb sync` command.
# About 3 minutes on 2 CPU cores, install included. From a wheel (`pip install cubcam`) `cubcam demo` is the same.
#
# With real CUB-200-2011 (CUB_ROOT=/path/holding/CUB_200_2011 ./demo.sh) it runs the real configs instead
# (configs/classifier.yaml, configs/embedding.yaml: ResNet-50, ImageNet weights, 224 px): that is GPU work, hours on
# a CPU. Extra arguments go to both `cubcam fit` calls, e.g. ./demo.sh --trainer.max_epochs 2
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/cubcam ]; then
    echo "== installing cubcam into .venv"
    python3 -m venv .venv
    .venv/bin/pip install -q --no-compile -e . --config-settings editable_mode=strict
fi
exec .venv/bin/cubcam demo "$@"
