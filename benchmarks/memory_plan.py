#!/usr/bin/env python
"""The memory plan (``vlm_grpo_ma/training/memory_plan.py``) of the paper's setting for
Qwen2.5-VL-3B and -7B on 1, 2 and 8 GPUs of 80 GB: ESTIMATES, computed from the models' published
configs (no weights are read, nothing runs on a GPU).

Setting: the shipped ``configs/affordance.qwen2_5_vl_3b.yaml`` (ZeRO-3, bf16, gradient
checkpointing, frozen vision, max_pixels 1003520, SFT micro-batch 4 at max_length 2048, RL T4A4
with 512 thought / 128 answer tokens, 32 prompts per step, RL micro-batch 1), with the model
swapped and the number of ranks varied; ``--deepspeed`` and other overrides are passed through.

Usage:
    python benchmarks/memory_plan.py                       # prints the table, writes benchmarks/results/memory_plan.json
    python benchmarks/memory_plan.py --deepspeed configs/deepspeed/zero3_offload.json --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlm_grpo_ma.resources import shipped_dir

GPU_GB = 80


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2,8")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args, overrides = ap.parse_known_args(argv)

    from vlm_grpo_ma.training.cli import parse_train_config
    from vlm_grpo_ma.training.engine import resolve_ds_config
    from vlm_grpo_ma.training.memory_plan import GiB, QWEN25_VL, deepspeed_estimate, plan_memory, setting_from_config, shape_from_config

    base = str(shipped_dir("configs") / "affordance.qwen2_5_vl_3b.yaml")
    rows = []
    for name, make in QWEN25_VL.items():
        cfg = parse_train_config(["--config", base, "--bf16", "true", *overrides])
        ds = resolve_ds_config(cfg.run.deepspeed, micro_batch_size=1, grad_accum_steps=1, bf16=True,
                               max_grad_norm=1.0, lr=1.0, weight_decay=0.0)
        m = cfg.model
        shape = shape_from_config(make(), lora_r=m.lora_r, lora_target_modules=m.lora_target_modules,
                                  freeze_vision=m.freeze_vision)
        for n in (int(g) for g in args.gpus.split(",")):
            s = setting_from_config(cfg, ds, n)
            plan = plan_memory(shape, s)
            plan.allowance = 1.5 * GiB + 0.1 * plan.phase_total(plan.peak_phase)  # as on a GPU (check_before_launch)
            plan.capacity, plan.device = GPU_GB * 1e9, f"{GPU_GB} GB GPU"
            plan.deepspeed_estimate = deepspeed_estimate(shape, s, min(n, 8))
            rows.append({
                "model": f"Qwen2.5-VL-{name}", "gpus": n, "params": shape.total_params,
                "trainable": shape.trainable_params,
                **{f"{ph}_gib": round(plan.phase_total(ph) / GiB, 2) for ph in plan.components},
                "peak_gib": round(plan.peak / GiB, 2), "peak_phase": plan.peak_phase, "fits_80gb": plan.fits,
                "deepspeed_model_states_gib": round(deepspeed_estimate(shape, s, min(n, 8)).get("per GPU", 0) / GiB, 2),
                "plan": plan.format(),
                "components": {ph: {k: round(v / GiB, 2) for k, v in c.items()} for ph, c in plan.components.items()},
            })
    head = f"{'model':<16}{'GPUs':>5}{'rollout':>9}{'RL step':>9}{'SFT step':>9}{'peak':>8}  fits 80 GB  (GiB per GPU, estimates)"
    print(head)
    for r in rows:
        print(f"{r['model']:<16}{r['gpus']:>5}{r['rollout_gib']:>9.1f}{r['rl_step_gib']:>9.1f}{r['sft_step_gib']:>9.1f}"
              f"{r['peak_gib']:>8.1f}  {'yes' if r['fits_80gb'] else 'NO'}")
    print("\nQwen2.5-VL-3B on 8 GPUs, as the trainer prints it:\n" + next(r["plan"] for r in rows if r["gpus"] == 8))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"what": "memory plan estimates (not measurements), per GPU", "config": base, "overrides": overrides,
              "gpu_gb": GPU_GB, "rows": rows}
    (out / "memory_plan.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
