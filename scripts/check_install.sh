#!/usr/bin/env bash
# The installed product, as a new user gets it: build the wheel from the repository's files, install
# it into a fresh virtual environment, and from another folder run
#   - the trainer under the deepspeed launcher on a tiny budget: `deepspeed --module vlm_grpo_ma train`
#     (SFT 2 steps, then GRPO-MA 1 step, held-out evaluations), and the `vlm-grpo-ma` console
#     script's path under the launcher (SFT 1 step);
#   - the benchmark runner on a bundled synthetic suite (`vlm-grpo-ma bench run`).
# Everything lives in a temporary folder (KEEP=1 keeps it); prints the seconds of each step.
# torch: as scripts/setup.sh does it (the CPU build 2.13.0 without an NVIDIA GPU, pinned in the same
# pip call so that no CUDA build is pulled; the machine's own torch through --system-site-packages
# where one is installed).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
T=$(mktemp -d "${TMPDIR:-/tmp}/vlm-grpo-ma-install.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$T"' EXIT
t0=$SECONDS
step() { echo "[check_install $((SECONDS - t0)) s] $*"; }
quiet_pip() { "$@" --disable-pip-version-check -q 2> >(grep -v "^WARNING: Location 'file:" >&2); }

step "wheel from the repository's files (tracked and new, nothing ignored) in $T/src"
mkdir -p "$T/src" "$T/dist" "$T/run"
(cd "$ROOT" && git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$T/src" 2>/dev/null || true)
# the repository's venv (scripts/setup.sh, which has setuptools) builds it without an isolated
# build environment (faster); otherwise pip builds it as a user's `pip install .` would
if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import setuptools" 2>/dev/null; then
  quiet_pip "$ROOT/.venv/bin/python" -m pip wheel --no-deps --no-build-isolation -w "$T/dist" "$T/src"
else
  quiet_pip "$PY" -m pip wheel --no-deps -w "$T/dist" "$T/src"
fi
WHEEL=$(ls "$T"/dist/vlm_grpo_ma-*.whl)

step "fresh venv, install $(basename "$WHEEL")"
if "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m venv --system-site-packages "$T/venv"; TORCH=()
elif ls /opt/wheels/torch-2.13.0+cpu-* >/dev/null 2>&1 || ! (command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1); then
  "$PY" -m venv "$T/venv"; TORCH=("torch==2.13.0")
else
  "$PY" -m venv "$T/venv"; TORCH=()
fi
quiet_pip "$T/venv/bin/python" -m pip install --no-compile "${TORCH[@]}" "$WHEEL"  # no .pyc pass: ~1.4 GB of packages
export PATH="$T/venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1); then export DS_ACCELERATOR=cpu; fi

cd "$T/run"  # nothing of the repository is importable or readable from here
step "installed: one import name, the shipped files, the console scripts"
python - <<'PY'
import importlib.metadata as md, importlib.util, pathlib, vlm_grpo_ma
from vlm_grpo_ma.resources import shipped_dir
dist = md.distribution("vlm-grpo-ma")
top = dist.read_text("top_level.txt").split()
assert top == ["vlm_grpo_ma"], f"the wheel claims import names {top}"
assert "site-packages" in vlm_grpo_ma.__file__, vlm_grpo_ma.__file__
for name in ("tasks", "prompts", "configs", "suites"):
    spec = importlib.util.find_spec(name)
    assert spec is None or "vlm_grpo_ma" not in str(spec.origin), f"{name} installed top-level: {spec.origin}"
need = {"configs": ["affordance.tiny.yaml", "deepspeed/zero3.json"], "prompts": ["affordance.txt"],
        "suites": ["synthetic-affordance.yaml", "prompts/coco.txt"]}
for kind, files in need.items():
    for f in files:
        assert (shipped_dir(kind) / f).is_file(), f"{kind}/{f} not shipped"
scripts = {e.name for e in dist.entry_points if e.group == "console_scripts"}
assert {"vlm-grpo-ma", "vlm-grpo-ma-train"} <= scripts, scripts
print("  top_level.txt:", top, "| console scripts:", sorted(scripts))
PY
vlm-grpo-ma bench list >/dev/null

TINY=(--task affordance --sft_steps 2 --sft_batch_size 4 --sft_warmup_steps 0 --rl_steps 1 --prompts_per_step 2
      --num_thoughts 2 --answers_per_thought 2 --max_thought_tokens 12 --max_answer_tokens 10
      --eval_samples 4 --eval_batch_size 4 --log_every 1)
check_run() {
  python - "$1" <<'PY'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
s = json.loads((run / "summary.json").read_text())
assert set(s["evals"]) == {"before_sft", "after_sft", "after_rl"}, s["evals"].keys()
assert s["sft"]["steps"] == 2 and s["rl"]["steps"] == 1, (s["sft"], s["rl"])
for stage in ("sft", "rl"):
    assert (run / stage / "final" / "config.json").is_file(), f"no {stage}/final model"
print(f"  {run.name}: after_rl mean_iou {s['evals']['after_rl']['mean_iou']:.4f}, SFT {s['sft']['seconds']:.1f} s, RL {s['rl']['seconds']:.1f} s")
PY
}
step "trainer: deepspeed --module vlm_grpo_ma train (SFT 2 steps, RL 1 step)"
deepspeed --num_accelerators 1 --module vlm_grpo_ma train "${TINY[@]}" --output_dir run-module > train-module.log 2>&1 \
  || { tail -40 train-module.log; exit 1; }
check_run run-module
step "trainer: deepspeed \$(command -v vlm-grpo-ma) train (the console script's path; SFT 1 step)"
deepspeed --num_accelerators 1 "$(command -v vlm-grpo-ma)" train --task affordance --stage sft --sft_steps 1 \
  --sft_batch_size 2 --sft_warmup_steps 0 --eval_samples 0 --output_dir run-script > train-script.log 2>&1 \
  || { tail -40 train-script.log; exit 1; }
test -f run-script/sft/final/config.json || { echo "no run-script/sft/final model"; tail -40 train-script.log; exit 1; }

step "benchmark: vlm-grpo-ma bench run --suite synthetic-affordance (8 samples, tiny model)"
vlm-grpo-ma bench run --suite synthetic-affordance --model tiny-qwen2.5-vl --limit 8 --max-new-tokens 24 \
  --output bench > bench.log 2>&1 || { tail -40 bench.log; exit 1; }
python - <<'PY'
import json, pathlib
m = json.loads(pathlib.Path("bench/metrics.json").read_text())
assert m["n_samples"] == 8, m["n_samples"]
assert {"mean_iou", "parse_rate"} <= set(m["metrics"]), m["metrics"]
assert len(pathlib.Path("bench/predictions.jsonl").read_text().splitlines()) == 8
print("  bench:", {k: round(v, 4) for k, v in m["metrics"].items() if isinstance(v, float)})
PY
step "passed"
