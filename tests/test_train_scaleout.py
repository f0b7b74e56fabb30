"""Scale-out as users run it (slow: each test starts launcher processes on loopback).

- Two "nodes" on this machine, each its own launcher with one rank (torchrun --nnodes 2, and the
  deepspeed launcher's --no_ssh with --node_rank), train like one node with two ranks.
- A checkpoint written on 2 ranks resumes on 1, and one written on 1 resumes on 2, with every
  shipped DeepSpeed config and LoRA (ZeRO checkpoints through DeepSpeed's universal checkpoint,
  stage-0 ones as they are): the steps after the resume and the final weights are those of the
  uninterrupted run; the same on two deepspeed-launcher "nodes", and RL after it.
- A rank that raises stops the other node's rank too, with the cause named, instead of a hang.
"""

from __future__ import annotations

import json
import math
import shutil
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
# launchers as modules of this interpreter: a venv's console scripts may name another one
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]
COMMON = ["--task", "affordance", "--deepspeed", "configs/deepspeed/zero3.json", "--sft_batch_size", "4", "--sft_warmup_steps", "0", "--prompts_per_step", "2",
          "--num_thoughts", "2", "--answers_per_thought", "2", "--max_thought_tokens", "8", "--max_answer_tokens", "8",
          "--eval_batch_size", "2", "--report_to", "none", "--log_every", "0"]
# 3 SFT steps with a checkpoint after step 2: a resume from it takes step 3 on another world size
SFT3 = COMMON + ["--sft_steps", "3", "--save_every", "2", "--eval_samples", "0"]


def _fail(cmd, p, out="", err="") -> str:
    return f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{out[-3000:]}\n{err[-6000:]}"


def _run(cmd: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, _fail(cmd, p, p.stdout, p.stderr)
    return p


def _nodes(cmds: list[list[str]], timeout: int = 400, check: bool = True) -> list[tuple[int, str, str]]:
    """Run the launcher commands of all nodes at once; (returncode, stdout, stderr) of each."""
    procs = [subprocess.Popen(c, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    out = []
    try:
        for c, p in zip(cmds, procs):
            o, e = p.communicate(timeout=timeout)
            assert not check or p.returncode == 0, _fail(c, p, o, e)
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def _torchrun_nodes(script_args: list[str], script: str = SCRIPT) -> list[list[str]]:
    port = free_port()
    return [[*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(i), "--master_addr",
             "127.0.0.1", "--master_port", str(port), script, *script_args] for i in range(2)]


def _deepspeed_nodes(tmp_path: Path, script_args: list[str]) -> list[list[str]]:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # names only: --no_ssh never contacts them
    port = free_port()
    return [[*DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(i),
             "--master_addr", "127.0.0.1", "--master_port", str(port), SCRIPT, *script_args] for i in range(2)]


def _metrics(run: Path, stage: str) -> list[dict]:
    from vlm_grpo_ma.training.metrics import read_metrics

    return read_metrics(run / "metrics.jsonl", stage)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _same_sft(a: Path, b: Path, steps: list[int]) -> None:
    """Same SFT losses at ``steps`` and same final weights, within the float tolerance of
    summing over 1 vs 2 ranks (test_train_distributed.py measures and explains it)."""
    ma = {r["step"]: r for r in _metrics(a, "sft")}
    mb = {r["step"]: r for r in _metrics(b, "sft")}
    for s in steps:
        assert ma[s]["data/tokens"] == mb[s]["data/tokens"], s
        assert math.isclose(ma[s]["loss/sft"], mb[s]["loss/sft"], rel_tol=1e-5), (s, ma[s]["loss/sft"], mb[s]["loss/sft"])
    wa, wb = _weights(a / "sft" / "final"), _weights(b / "sft" / "final")
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """1 node x 2 ranks (the deepspeed launcher): SFT 3 steps (checkpoint at 2), then RL 1 step."""
    run = tmp_path_factory.mktemp("ref") / "run"
    _run([*DEEPSPEED, "--num_accelerators", "2", "--master_port", str(free_port()), SCRIPT, *SFT3,
          "--rl_steps", "1", "--output_dir", str(run)])
    return run


def test_torchrun_two_loopback_nodes_match_one_node_two_ranks(two_rank_run, tmp_path):
    run = tmp_path / "run"
    res = _nodes(_torchrun_nodes([*SFT3, "--rl_steps", "1", "--output_dir", str(run)]))
    _same_sft(two_rank_run, run, [1, 2, 3])
    rl = _metrics(run, "rl")
    # global rank 0 alone logs (one row per step, not one per node) and writes the summary
    assert [r["step"] for r in rl] == [1] and all(math.isfinite(r["loss/policy"]) for r in rl)
    assert (run / "rl" / "final" / "model.safetensors").is_file() and (run / "summary.json").is_file()
    assert "== affordance" in res[0][1] and "== affordance" not in res[1][1]  # the summary: global rank 0 only
    # each rank wrote its own RNG file into the one shared checkpoint (global ranks 0 and 1)
    assert list((run / "sft" / "checkpoints").glob("step-*/rng-rank1.pt"))


#: every DeepSpeed config the project ships, and LoRA on the real-model one (ZeRO-3)
SHIPPED = sorted(p.stem for p in (ROOT / "configs" / "deepspeed").glob("*.json"))
RESUME_CASES = [(z, []) for z in SHIPPED] + [("zero3", ["--lora_r", "4", "--lora_alpha", "8"])]


@pytest.mark.parametrize("zero,extra", RESUME_CASES, ids=[z + ("-lora" if e else "") for z, e in RESUME_CASES])
def test_resume_on_another_number_of_ranks_every_shipped_config(zero, extra, tmp_path):
    """2 ranks -> 1 -> 2 with each shipped DeepSpeed config: a 2-rank run of 4 SFT steps
    (checkpoint every step; warm-up then cosine, so the schedule matters); its step-2 checkpoint
    resumed on 1 rank (steps 3-4); that run's step-3 checkpoint (written by 1 rank) resumed on 2
    (step 4).  Each resumed step has the uninterrupted run's data (token count), learning rate
    and loss (step 4's loss depends on the Adam moments restored), and the final weights match."""
    assert {"zero0", "zero2", "zero3", "zero3_offload"} <= set(SHIPPED)
    args = ["--task", "affordance", "--stage", "sft", "--deepspeed", f"configs/deepspeed/{zero}.json",
            "--sft_steps", "4", "--save_every", "1", "--keep_last", "4", "--sft_batch_size", "4",
            "--sft_warmup_steps", "2", "--lr_schedule", "cosine", "--eval_samples", "0", "--report_to", "none",
            "--log_every", "1", *extra]
    two = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", SCRIPT, *args]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _run([*two, "--output_dir", str(a)])
    ckpts = a / "sft" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-000000{i}" for i in (1, 2, 3)]
    # N -> M: the 2-rank step-2 checkpoint on 1 rank
    shutil.copytree(a, b)
    shutil.rmtree(b / "sft" / "final")
    shutil.rmtree(b / "sft" / "checkpoints" / "step-0000003")
    pb = _run([sys.executable, SCRIPT, *args, "--output_dir", str(b)])
    how = "are whole (no ZeRO)" if zero == "zero0" else "universal checkpoint"
    assert "written by 2 ranks, resuming on 1" in pb.stderr and how in pb.stderr and "resumed sft" in pb.stderr
    # M -> N: the step-3 checkpoint that the 1-rank run wrote, on 2 ranks
    assert json.loads((b / "sft" / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())["world_size"] == 1
    shutil.copytree(b, c)
    shutil.rmtree(c / "sft" / "final")
    pc = _run([*two, "--output_dir", str(c)])
    assert "written by 1 ranks, resuming on 2" in pc.stderr and how in pc.stderr, pc.stderr[-3000:]
    ref = {r["step"]: r for r in _metrics(a, "sft")}
    for run, steps in ((b, [3, 4]), (c, [4])):
        rows = {r["step"]: r for r in _metrics(run, "sft")}
        for s in steps:
            assert rows[s]["data/tokens"] == ref[s]["data/tokens"], (run.name, s)
            assert rows[s]["lr"] == ref[s]["lr"], (run.name, s)
            assert math.isclose(rows[s]["loss/sft"], ref[s]["loss/sft"], rel_tol=1e-5), (run.name, s, rows[s], ref[s])
        wa, wr = _weights(a / "sft" / "final"), _weights(run / "sft" / "final")
        assert set(wa) == set(wr)
        for k in wa:
            torch.testing.assert_close(wr[k], wa[k], rtol=1e-4, atol=1e-5, msg=f"{run.name}: {k}")
    assert {ref[s]["lr"] for s in (2, 3, 4)} != {ref[2]["lr"]}  # the schedule moved across the resumes
    assert ref[4]["loss/sft"] < ref[2]["loss/sft"]  # the steps resumed did train


def test_one_rank_checkpoint_resumes_on_two_deepspeed_no_ssh_nodes(tmp_path):
    one, run = tmp_path / "one", tmp_path / "run"
    _run([sys.executable, SCRIPT, *SFT3, "--stage", "sft", "--output_dir", str(one)])
    shutil.copytree(one, run)
    shutil.rmtree(run / "sft" / "final")
    res = _nodes(_deepspeed_nodes(tmp_path, [*SFT3, "--rl_steps", "1", "--output_dir", str(run)]))
    assert "universal checkpoint" in res[0][2] and "resumed sft" in res[0][2]
    _same_sft(one, run, [3])
    assert [r["step"] for r in _metrics(run, "rl")] == [1]  # and RL after it, to the end
    assert (run / "rl" / "final" / "model.safetensors").is_file()


_FAILING = """
import os
from vlm_grpo_ma.task import register_task
from vlm_grpo_ma.tasks.affordance import AffordanceTask


@register_task
class FailingOnRank1(AffordanceTask):  # registered in-process: replaces the shipped "affordance"
    name = "affordance"

    def messages(self, sample, family):  # a data error on rank 1's shard (rewards that raise score 0 instead)
        if os.environ["RANK"] == "1":
            raise ValueError("bad sample in this shard")
        return super().messages(sample, family)


from vlm_grpo_ma.training.cli import main

main()
"""


def test_a_failing_rank_stops_the_other_node_with_the_cause(tmp_path):
    script = tmp_path / "failing_train.py"
    script.write_text(_FAILING)
    args = [*COMMON, "--stage", "rl", "--rl_steps", "1",
            "--eval_samples", "0", "--output_dir", str(tmp_path / "run")]
    t0 = time.time()
    (rc0, _, err0), (rc1, _, err1) = _nodes(_torchrun_nodes(args, str(script)), timeout=300, check=False)
    assert rc1 != 0 and "bad sample in this shard" in err1, err1[-3000:]
    assert rc0 != 0, err0  # node 0's rank did not wait in a collective for a peer that is gone ...
    # ... and says why it stopped
    assert "stopping because another rank failed: rank 1" in err0 and "bad sample in this shard" in err0, err0[-3000:]
    assert time.time() - t0 < 300


def test_node_local_output_folders_are_refused_at_start(tmp_path):
    """Each "node" given its own folder (as if --output_dir were on a local disk): refused before
    any model is loaded, naming the rank that cannot see rank 0's files."""
    cmds = _torchrun_nodes([*COMMON, "--sft_steps", "1", "--rl_steps", "0", "--eval_samples", "0"])
    for i, c in enumerate(cmds):
        c += ["--output_dir", str(tmp_path / f"node{i}")]
    (rc0, _, err0), (rc1, _, _) = _nodes(cmds, timeout=300, check=False)
    assert rc0 != 0 and rc1 != 0
    assert "is not shared by all ranks (rank 1 on " in err0, err0[-3000:]
    assert not (tmp_path / "node0" / "sft").exists()
