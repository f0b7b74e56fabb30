"""Shared fixtures.

``tiny_policy(family)`` loads a tiny random Qwen-VL policy (``"qwen2_vl"``, ``"qwen2_5_vl"``,
``"qwen3_vl"`` or a tiny model name such as ``"tiny-qwen2.5-vl"``) through
:func:`vlm_grpo_ma.models.load_policy`.  The checkpoint folder is built once (in the normal tiny
cache: ``$VLM_GRPO_MA_CACHE`` or ``~/.cache/vlm_grpo_ma``) and every call loads a FRESH copy of
the model from it (about 0.1 s), so a test may train or modify what it gets::

    def test_something(tiny_policy):
        policy = tiny_policy("qwen2_5_vl")              # Policy(model, processor, family, tokenizer)
        policy = tiny_policy("qwen3_vl", max_pixels=64 * 32 * 32)   # load_policy keyword arguments

``tiny_model_dir(family)`` gives the checkpoint folder itself (for CLI / subprocess tests).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="session")
def tiny_model_dir():
    """Factory: family or tiny name -> the folder of its cached tiny checkpoint (built once)."""
    from vlm_grpo_ma.models import ensure_tiny

    cache: dict[str, str] = {}

    def get(name: str = "qwen2_5_vl") -> str:
        if name not in cache:
            cache[name] = str(ensure_tiny(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir):
    """Factory: family or tiny name (+ load_policy keyword arguments) -> a freshly loaded Policy."""
    from vlm_grpo_ma.models import load_policy

    def get(name: str = "qwen2_5_vl", **kwargs):
        return load_policy(tiny_model_dir(name), **kwargs)

    return get
