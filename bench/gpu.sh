#!/usr/bin/env bash
# The GPU-bound scenarios of bench/callback_overhead.py on a real GPU (about 5 minutes on one):
#   bash bench/gpu.sh [more callback_overhead.py options]
# The training step's GPU time is a spinning kernel of ResNet-50's measured time; the callback's work runs as it
# would in training (maps on the device, the rest off the loop).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
"$python" bench/callback_overhead.py --device cuda --epochs 3 --strides 32 "$@"
"$python" bench/callback_overhead.py --device cuda --epochs 3 --strides 16 --scenarios classifier embedding "$@"
