#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the package and its test extras.
# - On a machine without an NVIDIA GPU, torch is pinned to the CPU build (2.13.0) so that no
#   multi-GB CUDA build is pulled.
# - Where torch is already importable by the chosen Python (a GPU machine), that torch is kept:
#   the venv is created with --system-site-packages and torch is not reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.setup-done"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
have_torch=0
if "$PY" -c "import torch" >/dev/null 2>&1; then have_torch=1; fi
if [ ! -x "$VENV/bin/python" ]; then
  if [ "$have_torch" = 1 ]; then
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
# (this machine's pip config names local indexes that do not hold every package: drop those warnings)
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    pip_install torch
  else
    # A CPU build: from the machine's wheel cache when it has one, else PyTorch's CPU index.
    if ls /opt/wheels/torch-2.13.0+cpu-* >/dev/null 2>&1; then
      pip_install "torch==2.13.0"
    else
      pip_install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
fi
pip_install -e ".[dev]"
touch "$stamp"
echo "set-up done: $VENV ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
