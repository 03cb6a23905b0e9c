#!/usr/bin/env bash
# Checks a machine with one or more CUDA GPUs in one command, within a hard time budget (7.75 min at most,
# --quick 3.75): environment, NCCL, resume correctness, step speed and memory, data path. Writes
# gpu_check.json and gpu_check.md to --out (default ./gpu_check). See docs/gpu.md.
#   bash launch/gpu_check.sh [--quick] [--out DIR] [--device cpu]
# Uses .venv, made by launch/setup_env.sh when missing (it must hold a CUDA build of torch for --device cuda);
# IJEPA_PYTHON picks another interpreter that has ijepa-scale's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${IJEPA_PYTHON:-.venv/bin/python}
if [ -z "${IJEPA_PYTHON:-}" ] && [ ! -x .venv/bin/python ]; then
  bash launch/setup_env.sh
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m ijepa_scale.cli gpu-check "$@"
