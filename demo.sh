#!/usr/bin/env bash
# cubcam demo: one command from a fresh clone.
#   1. makes .venv and installs cubcam into it (if .venv is absent);
#   2. writes a synthetic CUB-format dataset to data/synthetic_cub (if absent);
#   3. trains a ResNet-18 classifier, then a triplet embedding net, on CPU (configs/demo/*.yaml), logging to W&B
#      offline and keeping checkpoints; then prints where both are and the `wandb sync` command.
# About 5 minutes on 2 CPU cores, install included.
#
# With real CUB-200-2011 (CUB_ROOT=/path/holding/CUB_200_2011 ./demo.sh) it runs the real configs instead
# (configs/classifier.yaml, configs/embedding.yaml: ResNet-50, ImageNet weights, 224 px): that is GPU work, hours on
# a CPU. Extra arguments go to both `cubcam fit` calls, e.g. ./demo.sh --trainer.max_epochs 2
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/cubcam ]; then
    echo "== installing cubcam into .venv"
    python3 -m venv .venv
    .venv/bin/pip install -q -e . --config-settings editable_mode=strict
fi
export WANDB_MODE=offline          # nothing leaves this machine; `wandb sync` uploads later
export WANDB_SILENT=true

if [ -n "${CUB_ROOT:-}" ]; then
    configs=(configs/classifier.yaml configs/embedding.yaml)
    data_args=(--data.root "$CUB_ROOT" --data.download false)
    echo "== using CUB-200-2011 at $CUB_ROOT with the full-size configs"
else
    configs=(configs/demo/classifier.yaml configs/demo/embedding.yaml)
    data_args=()
    if [ ! -f data/synthetic_cub/CUB_200_2011/images.txt ]; then
        echo "== writing the synthetic CUB dataset to data/synthetic_cub"
        .venv/bin/python -m cubcam.train.data.synthetic --out data/synthetic_cub --classes 8 --per-class 40 --size 128 --seed 0
    fi
fi

for config in "${configs[@]}"; do
    echo "== cubcam fit --config $config"
    start=$SECONDS
    .venv/bin/cubcam fit --config "$config" "${data_args[@]}" "$@"
    echo "== $config done in $((SECONDS - start)) s"
done

echo
echo "== results"
for run in $(ls -tdr runs/wandb/offline-run-* 2>/dev/null | tail -n ${#configs[@]}); do
    id=${run##*-}
    echo "W&B offline run: $run"
    echo "   checkpoints:  runs/cubcam/$id/checkpoints/ ($(ls runs/cubcam/"$id"/checkpoints 2>/dev/null | tr '\n' ' '))"
    echo "   upload with:  .venv/bin/wandb sync $run"
done
