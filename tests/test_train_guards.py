"""What protects a run folder: one live run per folder (an OS-released lock, refused naming the
holder's pid), and a finished stage asked for another step budget refuses with the reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vlm_grpo_ma.training import distributed as dist

dist.prepare_environment()


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    dist.init_distributed()
    yield


_HOLDER = """
import sys, time
from vlm_grpo_ma.training import distributed as dist, lock
dist.init_distributed()
lock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return env


def test_second_run_on_a_held_folder_refuses_naming_the_pid_and_sigkill_frees_it(tmp_path):
    from vlm_grpo_ma.training import lock

    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(lock.RunFolderLocked, match=rf"pid {holder.pid} on "):
            lock.acquire(tmp_path)
        holder.send_signal(signal.SIGKILL)  # the OS releases the lock with the process
        holder.wait()
        lock.acquire(tmp_path)
        info = json.loads((tmp_path / lock.LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and [r["pid"] for r in info["ranks"]] == [os.getpid()]
        lock.acquire(tmp_path)  # again in the same process (a new run here): supersedes, no self-refusal
    finally:
        if holder.poll() is None:
            holder.kill()
        lock.release(tmp_path)


def test_released_lock_can_be_taken_by_another_process(tmp_path):
    from vlm_grpo_ma.training import lock

    lock.acquire(tmp_path)
    lock.release(tmp_path)
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked", p.stderr.read()
    finally:
        p.kill()
        p.wait()


def _fake_final(stage_dir, steps):
    final = stage_dir / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final / "stage_record.json").write_text(json.dumps({"stage": "sft", "steps": steps}))


def test_finished_stage_with_another_budget_refuses_with_the_reason(tmp_path):
    from vlm_grpo_ma.training.stage import BudgetChanged, check_finished_budget

    _fake_final(tmp_path / "sft", 4)
    assert check_finished_budget(tmp_path / "sft", "sft", 4) == 4
    with pytest.raises(BudgetChanged, match=r"after 4 steps, and --sft_steps 6 asks for more"):
        check_finished_budget(tmp_path / "sft", "sft", 6)
    with pytest.raises(BudgetChanged, match=r"--rl_steps 2 asks for fewer"):
        _fake_final(tmp_path / "rl", 3)
        check_finished_budget(tmp_path / "rl", "rl", 2)
    assert check_finished_budget(tmp_path / "old", "sft", 9) is None  # no record (older run): skipped as before


def test_rerun_with_a_larger_budget_refuses_and_the_same_budget_skips(tmp_path):
    from vlm_grpo_ma.training.cli import main
    from vlm_grpo_ma.training.stage import BudgetChanged

    args = ["--task", "affordance", "--output_dir", str(tmp_path), "--sft_batch_size", "2", "--sft_warmup_steps", "0",
            "--rl_steps", "0", "--eval_samples", "0", "--report_to", "none", "--stage", "sft"]
    first = main(args + ["--sft_steps", "2"])
    assert first["sft"]["steps"] == 2
    assert json.loads((tmp_path / "sft" / "final" / "stage_record.json").read_text())["steps"] == 2
    with pytest.raises(BudgetChanged, match="already complete .* after 2 steps, and --sft_steps 3 asks for more"):
        main(args + ["--sft_steps", "3"])
    from vlm_grpo_ma.training import lock

    assert not lock._HELD  # the refused run gave its lock up
    again = main(args + ["--sft_steps", "2"])
    assert again["sft"]["steps"] == 2
