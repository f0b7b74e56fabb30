"""``python -m vlm_grpo_ma`` = the ``vlm-grpo-ma`` command (and ``deepspeed --module vlm_grpo_ma``)."""

import sys

from vlm_grpo_ma.cli import main

if __name__ == "__main__":
    sys.exit(main())
