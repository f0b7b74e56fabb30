"""Multi-process checks of the trainer (slow: each starts fresh Python processes).

- 2 CPU ranks under the deepspeed launcher (gloo, ZeRO-3) take the same SFT steps as 1 rank on
  the same global batches: same losses, same weights, within float tolerance; RL runs on both
  ranks without deadlock, and the held-out evaluation is sharded over the ranks.
- A run killed with SIGKILL after a checkpoint resumes and continues exactly like a run that
  was never interrupted.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests._launch import clean_env, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "train.py")
COMMON = ["--task", "affordance", "--sft_batch_size", "4", "--sft_warmup_steps", "0", "--prompts_per_step", "2",
          "--num_thoughts", "2", "--answers_per_thought", "2", "--max_thought_tokens", "10", "--max_answer_tokens", "8",
          "--eval_batch_size", "2", "--report_to", "none",
          "--deepspeed", "configs/deepspeed/zero3.json"]  # the affordance demo config itself runs without ZeRO


def _run(cmd: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def _metrics(run: Path, stage: str) -> list[dict]:
    from vlm_grpo_ma.training.metrics import read_metrics

    return read_metrics(run / "metrics.jsonl", stage)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_two_ranks_match_one_rank(tmp_path):
    # the launcher as a module of this interpreter: a venv's console script may name another one
    deepspeed = [sys.executable, "-m", "deepspeed.launcher.runner"]
    args = COMMON + ["--sft_steps", "3", "--rl_steps", "2", "--eval_samples", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, SCRIPT, *args, "--output_dir", str(one)])
    _run([*deepspeed, "--num_accelerators", "2", "--master_port", str(free_port()), SCRIPT, *args,
          "--output_dir", str(two)])

    a, b = _metrics(one, "sft"), _metrics(two, "sft")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra["data/tokens"] == rb["data/tokens"]
        assert math.isclose(ra["loss/sft"], rb["loss/sft"], rel_tol=1e-5), (ra["loss/sft"], rb["loss/sft"])
        assert math.isclose(ra["grad/norm"], rb["grad/norm"], rel_tol=1e-4), (ra["grad/norm"], rb["grad/norm"])
    wa, wb = _weights(one / "sft" / "final"), _weights(two / "sft" / "final")
    assert set(wa) == set(wb)
    base = _weights_of_tiny()
    moved = max((wa[k] - base[k]).abs().max().item() for k in wa if k in base)
    assert moved > 1e-4  # the steps did change the weights ...
    # ... and identically on 1 and 2 ranks, up to float summation order: Adam moves every weight by
    # about lr (2e-3) per step whatever its gradient's size, so where a gradient nearly cancels
    # (the patch embedding's, summed over many patches) the order of that sum shows in m/sqrt(v);
    # measured up to 1.6e-6 there, 6e-7 elsewhere. atol 1e-5 is 0.2% of 3 steps' movement.
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)

    # evaluation: before SFT both runs decode the same model greedily (4 samples over 2 ranks)
    import json

    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert sa["evals"]["before_sft"] == sb["evals"]["before_sft"]
    # RL ran on both ranks (rollouts of different lengths, no deadlock) and finished
    rl = _metrics(two, "rl")
    assert [r["step"] for r in rl] == [1, 2] and all(math.isfinite(r["loss/policy"]) for r in rl)
    assert (two / "rl" / "final" / "model.safetensors").is_file() and "after_rl" in sb["evals"]


def _weights_of_tiny() -> dict[str, torch.Tensor]:
    from vlm_grpo_ma.models import ensure_tiny

    return _weights(Path(ensure_tiny("tiny-qwen2.5-vl")))


def test_sigkill_then_resume_continues_exactly(tmp_path):
    args = COMMON + ["--sft_steps", "2", "--rl_steps", "6", "--save_every", "2", "--keep_last", "2",
                     "--eval_samples", "0"]
    ref, run = tmp_path / "uninterrupted", tmp_path / "killed"
    _run([sys.executable, SCRIPT, *args, "--output_dir", str(ref)])

    proc = subprocess.Popen([sys.executable, SCRIPT, *args, "--output_dir", str(run)], cwd=ROOT, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = run / "rl" / "checkpoints" / "step-0000004"
    deadline = time.time() + 400
    while not target.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert target.is_dir(), "the run never wrote its step-4 checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "rl" / "final").exists()

    _run([sys.executable, SCRIPT, *args, "--output_dir", str(run)])  # same command: resumes
    a, b = _metrics(ref, "rl"), _metrics(run, "rl")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a[4:], b[4:]):  # steps 5 and 6 come from the resumed process
        for k, v in ra.items():
            if k.startswith("time/"):
                continue
            if isinstance(v, str):  # "nan" / "inf" as JSON writes them
                assert rb[k] == v, (ra["step"], k, v, rb[k])
            else:
                assert rb[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (ra["step"], k, v, rb[k])
    wa, wb = _weights(ref / "rl" / "final"), _weights(run / "rl" / "final")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-8, msg=k)


def test_two_ranks_run_the_objective_variants_dynamic_sampling_and_periodic_eval(tmp_path):
    """The collectives of the new paths on 2 ranks: batch reward scaling (gathered rewards),
    dynamic sampling's rounds and the fallback (every rank generates the same number of times),
    evaluation during training with keep-best (a collective save): the run finishes."""
    deepspeed = [sys.executable, "-m", "deepspeed.launcher.runner"]
    run = tmp_path / "two"
    args = COMMON + ["--stage", "rl", "--rl_steps", "2", "--eval_samples", "4", "--eval_every", "1",
                     "--keep_best_metric", "reward", "--dynamic_sampling", "pilot", "--dynamic_sampling_max_rounds", "1",
                     "--scale_rewards", "batch", "--importance_sampling_level", "sequence",
                     "--mask_truncated_completions", "--output_dir", str(run)]
    _run([*deepspeed, "--num_accelerators", "2", "--master_port", str(free_port()), SCRIPT, *args])
    rl = _metrics(run, "rl")
    assert [r["step"] for r in rl] == [1, 2] and all(math.isfinite(r["loss/policy"]) for r in rl)
    assert all(r["dynamic/rounds"] >= 2 and r["dynamic/prompts_trained"] >= 2 for r in rl)  # summed over ranks
    assert [r["step"] for r in _metrics(run, "rl_eval")] == [1, 2]
    assert (run / "rl" / "best" / "stage_record.json").is_file()
