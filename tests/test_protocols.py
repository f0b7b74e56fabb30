"""Both rollout backends implement the whole ``RolloutBackend`` protocol the trainer, the
evaluation and the benchmark runner call (checked on the classes: no model, no vLLM needed)."""

import inspect

from vlm_grpo_ma.rollout.hf import HFRolloutBackend
from vlm_grpo_ma.rollout.types import RolloutBackend
from vlm_grpo_ma.rollout.vllm import VLLMBackend


def test_backends_implement_the_protocol_with_its_signatures():
    methods = ("generate_tree", "generate_tree_from_messages", "generate")
    for cls in (HFRolloutBackend, VLLMBackend):
        assert issubclass(cls, RolloutBackend), cls
        for name in methods:
            want = list(inspect.signature(getattr(RolloutBackend, name)).parameters)
            got = list(inspect.signature(getattr(cls, name)).parameters)
            assert got[: len(want)] == want, (cls.__name__, name, got, want)
