#!/usr/bin/env bash
# Create .venv (or $VENV) and install consistent-diffusion with its test, metric and app extras.
# A torch already in the venv is kept (GPU users: install your CUDA build of torch first);
# otherwise the CPU build torch==${TORCH_VERSION:-2.13.0} is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
"$VENV/bin/python" -m pip install --quiet -e ".[test,metrics,app]"
echo "ready: $VENV/bin/consistent-diffusion"
