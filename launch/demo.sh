#!/usr/bin/env bash
# The demo: I-JEPA pretraining of a small ViT on Fashion-MNIST (real, offline) on 2 CPU ranks.
# Re-running resumes from logs/demo_fmnist/jepa-latest.pth.tar; extra arguments are config
# overrides (e.g. optimization.epochs=5) or replace the devices (DEVICES="cuda:0 cuda:1").
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
if [ ! -f data/fmnist/fmnist-train-index.json ]; then
  .venv/bin/python -m ijepa_scale.data.fashion_mnist --out data/fmnist --split train --num-shards 8 --per-class 500
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python main.py --fname configs/demo_fmnist_vit_tiny.yaml --devices ${DEVICES:-cpu cpu} "$@"
