"""Fingerprint of the RL objective: two RL steps of the tiny Qwen2.5-VL per objective variant
(every loss, aggregation mode, GSPO, batch scaling, overlong filtering and punishment, KL, TIS,
the three layouts, ZeRO-0 and ZeRO-3), each metric as an exact float (hex) and a SHA-256 of every
parameter after the steps.  Run it before and after a refactor of the objective and compare:

    python scripts/objective_fingerprint.py before.json          # on the old commit
    python scripts/objective_fingerprint.py after.json           # on the new one
    python scripts/objective_fingerprint.py --compare before.json after.json

Bit-identical files mean the change moved no number (same torch, same machine).  About 20 s on
2 CPU cores.  Optional trailing arguments pick variants by name.
"""
import hashlib
import json
import os
import sys
import tempfile

import torch

from vlm_grpo_ma.task import Reward, get_task
from vlm_grpo_ma.training import distributed as dist
from vlm_grpo_ma.training import stage as stg
from vlm_grpo_ma.training.cli import parse_train_config
from vlm_grpo_ma.training.engine import build_reference
from vlm_grpo_ma.training.rl import RLState, rl_step

VARIANTS = {
  "clipped-token-mean": [],
  "clipped-smtm-epochs2": ["--loss_agg_mode", "seq-mean-token-mean", "--ppo_epochs", "2"],
  "smts": ["--loss_agg_mode", "seq-mean-token-sum"],
  "smtsn-kl": ["--loss_agg_mode", "seq-mean-token-sum-norm", "--kl_coef", "0.1", "--kl_estimator", "k2"],
  "gspo-batch-mask-penalty": ["--importance_sampling_level", "sequence", "--scale_rewards", "batch",
                              "--mask_truncated_completions", "--overlong_penalty_cache", "4", "--ppo_epochs", "2"],
  "gspo-batch-penalty": ["--importance_sampling_level", "sequence", "--scale_rewards", "batch",
                         "--overlong_penalty_cache", "4", "--ppo_epochs", "2", "--kl_coef", "0.05"],
  "cispo-seq": ["--policy_loss", "cispo", "--cispo_cap", "1.1", "--importance_sampling_level", "sequence", "--ppo_epochs", "2"],
  "sapo": ["--policy_loss", "sapo", "--loss_agg_mode", "seq-mean-token-mean", "--ppo_epochs", "2"],
  "vespo": ["--policy_loss", "vespo", "--ppo_epochs", "2"],
  "grpo-m1-naive": ["--answers_per_thought", "1", "--num_thoughts", "4", "--adv_estimator", "grpo", "--train_layout", "naive"],
  "packed-noscale": ["--train_layout", "packed", "--no_scale_adv_by_std", "--clip_high", "0.28"],
  "tis": ["TIS", "--ppo_epochs", "2"],
  "dynamic-full": ["--dynamic_sampling", "full", "--dynamic_sampling_max_rounds", "1"],
  "zero0-micro2": ["--deepspeed", "configs/deepspeed/zero0.json"],
}

def shaped_task():
    """Affordance with a reward that varies on an untrained model (longer answers score more)."""
    task = get_task("affordance")
    def reward(thought, answer, sample, family):
        v = min(1.0, len(answer) / 40.0)
        return Reward(v, {p: v for p in task.reward_parts})
    task.reward = reward
    return task

def compare(a_path: str, b_path: str) -> int:
    a, b = json.load(open(a_path)), json.load(open(b_path))
    bad = 0
    for name in sorted(set(a) | set(b)):
        same = a.get(name) == b.get(name)
        bad += not same
        print(f"{name:28s} {'identical' if same else 'DIFFERENT'}")
        if not same and name in a and name in b:
            for i, (x, y) in enumerate(zip(a[name]["metrics"], b[name]["metrics"])):
                for key in sorted(set(x) | set(y)):
                    if x.get(key) != y.get(key):
                        print(f"    step {i + 1} {key}: {x.get(key)} -> {y.get(key)}")
    return 1 if bad else 0


def main() -> None:
    if sys.argv[1:2] == ["--compare"]:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    dist.prepare_environment()
    dist.init_distributed()
    out = {}
    names = sys.argv[2:] or list(VARIANTS)
    for name in names:
        extra = [e for e in VARIANTS[name] if e != "TIS"]
        tmp = tempfile.mkdtemp()
        cfg = parse_train_config(["--task", "affordance", "--output_dir", tmp, "--sft_batch_size", "4",
            "--prompts_per_step", "2", "--sft_warmup_steps", "0", "--deepspeed", "configs/deepspeed/zero3.json",
            "--eval_samples", "4", "--max_thought_tokens", "12", "--max_answer_tokens", "10", "--report_to", "none",
            "--num_thoughts", "2", "--answers_per_thought", "2", "--rl_lr", "1e-3", *extra])
        if "TIS" in VARIANTS[name]:
            cfg.rl.tis_cap = 1.5
        task = shaped_task()
        torch.manual_seed(0)
        micro = 2 if "micro2" in name else 1
        st = stg.build_stage(cfg, "rl", "tiny-qwen2.5-vl", global_batch=2, micro=micro, lr=1e-3, warmup=0, total_optimizer_steps=10)
        if cfg.rl.kl_coef > 0:
            st.reference = build_reference(cfg.model, "tiny-qwen2.5-vl", st.ds_config)
        state = RLState(task)
        ms = []
        for step in range(2):
            torch.manual_seed(100 + step)
            m = rl_step(st, cfg, task, state, task.synthetic(2, seed=1 + step), more=lambda r: task.synthetic(2, seed=10 + r))
            ms.append({k: float(v).hex() for k, v in sorted(m.items()) if not k.startswith("time/")})
        with st.gather():
            h = hashlib.sha256()
            for n, p in st.engine.module.named_parameters():
                h.update(n.encode()); h.update(p.detach().float().cpu().numpy().tobytes())
        out[name] = {"metrics": ms, "params": h.hexdigest()}
        print(name, h.hexdigest()[:16], ms[-1].get("loss/policy"), flush=True)
        stg.release(st)
    old = json.load(open(sys.argv[1])) if os.path.exists(sys.argv[1]) else {}
    old.update(out)
    json.dump(old, open(sys.argv[1], "w"), indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
