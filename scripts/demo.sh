#!/usr/bin/env bash
# The main job: set-up (idempotent), then SFT -> GRPO-MA on the tiny Qwen2.5-VL and synthetic
# affordance data.  Extra arguments go to scripts/train.py (e.g. --task detection).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1); then
  export DS_ACCELERATOR=cpu   # DeepSpeed's CPU accelerator (gloo); one rank by default
fi
export PATH="$PWD/.venv/bin:$PATH"
args=("$@")
[[ " ${args[*]-} " == *" --task "* ]] || args=(--task affordance "${args[@]}")
exec deepspeed scripts/train.py "${args[@]}"
