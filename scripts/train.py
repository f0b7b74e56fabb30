#!/usr/bin/env python
"""Train a Qwen-VL policy: SFT warm-start, then GRPO-MA, on DeepSpeed (ZeRO-3 by default).

    deepspeed scripts/train.py --task affordance                      # tiny model, synthetic data, CPU demo
    deepspeed --num_gpus 8 scripts/train.py --config configs/affordance.qwen2_5_vl_3b.yaml
    python scripts/train.py --task detection --stage rl --num_thoughts 16 --answers_per_thought 1
    python scripts/train.py --help                                    # every field, with its documentation

The pipeline itself reads top to bottom in vlm_grpo_ma/training/cli.py:main; an installed package
runs it as ``vlm-grpo-ma train ...`` or, under the launcher, ``deepspeed --module vlm_grpo_ma train ...``.
"""

import os

import torch

if not torch.cuda.is_available():  # DeepSpeed's CPU accelerator (gloo) must be chosen before its import
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from vlm_grpo_ma.cli import register_training_hooks  # noqa: E402
from vlm_grpo_ma.training.cli import main  # noqa: E402

if __name__ == "__main__":
    register_training_hooks()  # --eval_suite: benchmark suites by name
    main()
