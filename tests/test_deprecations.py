"""Our calls into transformers use no deprecated argument: a rollout on the tiny model emits no
DeprecationWarning or FutureWarning.

transformers 5.24 renamed the key/value cache argument ``past_key_values`` to ``cache`` (the old
name warns on every forward and is removed in 5.40); the HF rollout backend passes the name the
installed version knows.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from PIL import Image

from vlm_grpo_ma.data.collate import build_generation_inputs
from vlm_grpo_ma.models import load_policy
from vlm_grpo_ma.rollout import HFRolloutBackend, SamplingParams
from vlm_grpo_ma.rollout import hf as hf_rollout


@pytest.fixture(scope="module")
def policy_and_inputs():
    torch.manual_seed(0)
    policy = load_policy("tiny-qwen2.5-vl")
    messages = [[{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (64, 48), (200, 30, 30))},
        {"type": "text", "text": "Where is the red box?"}]}]]
    return policy, dict(build_generation_inputs(policy.processor, messages))


def _rollout_warnings(policy, inputs) -> list[str]:
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_thought_tokens=4, max_answer_tokens=3, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.generate_tree(inputs, K=2, M=2, sampling=sp)
    return [f"{w.category.__name__}: {w.message}" for w in caught
            if issubclass(w.category, (DeprecationWarning, FutureWarning))]


def test_rollout_uses_no_deprecated_argument(policy_and_inputs):
    assert _rollout_warnings(*policy_and_inputs) == []


@pytest.mark.skipif(Version(transformers.__version__) < Version("5.24"), reason="the rename came in 5.24")
def test_the_check_sees_the_old_cache_name(policy_and_inputs, monkeypatch):
    """The same rollout passing ``past_key_values`` does warn: the check above can fail."""
    monkeypatch.setattr(hf_rollout, "_CACHE_ARG", "past_key_values")
    assert any("past_key_values" in w for w in _rollout_warnings(*policy_and_inputs))
