#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and ijepa-scale (editable), plus the Debian
# Fashion-MNIST package. Safe to re-run. Usage: bash launch/setup_env.sh [dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends dataset-fashion-mnist
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
quiet_pip() {  # drop this machine's noise about missing local index folders, keep the exit status
  .venv/bin/pip "$@" 2> >(grep -v '^WARNING: Location' >&2)
}
extras=""
[ "${1:-}" = "dev" ] && extras="[dev]"
# torch is pinned here, not in setup.py: any looser spec pulls a multi-GB CUDA build.
quiet_pip install -q "$TORCH_SPEC" -e ".${extras}"
.venv/bin/python -c "import torch, ijepa_scale; print('torch', torch.__version__, '| ijepa-scale', ijepa_scale.__version__)"
