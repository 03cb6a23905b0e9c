#!/usr/bin/env bash
# Installs everything the tests need into .venv and runs the whole suite (unit + 2-rank integration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh dev
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q --timeout=600 "$@"
