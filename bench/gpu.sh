#!/usr/bin/env bash
# The GPU figures (about 7 minutes on one GPU):
#   bash bench/gpu.sh [more callback_overhead.py options]
# 1. MaxBoxAccV2's torch labeller on the GPU: every scenario against the NumPy labeller (identical hits checked),
#    and the callback's 512 maps at 224 px, measured beside the profiler-count projection (target 45 ms).
# 2. ROAD's iterative imputation on the GPU against SciPy's direct solve on the CPU (fills checked equal).
# 3. The GPU-bound scenarios of bench/callback_overhead.py: the training step's GPU time is a spinning kernel of
#    ResNet-50's measured time; the callback's work, the torch labeller included, runs as it would in training.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
"$python" bench/localization_speed.py --device cuda --maps 32
"$python" bench/road_solve.py --device cuda --images 16
"$python" bench/callback_overhead.py --device cuda --labeller real --epochs 3 --strides 32 "$@"
"$python" bench/callback_overhead.py --device cuda --labeller real --epochs 3 --strides 16 --scenarios classifier embedding "$@"
