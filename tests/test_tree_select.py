"""TreeRollout.select: the one way to take a sub-tree of prompts (micro-batches, dropped prompts)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlm_grpo_ma.rollout.types import TreeRollout


def _tree(B=3, K=2, M=2) -> TreeRollout:
    t = lambda *v: torch.tensor(v)  # noqa: E731
    return TreeRollout(
        prompt_ids=[t(b, b) for b in range(B)], prompt_mm_token_type_ids=[t(0, 0) for _ in range(B)],
        pixel_values=[torch.full((1, 2), float(b)) for b in range(B)], image_grid_thw=[None] * B,
        thought_ids=[[t(10 * b + k) for k in range(K)] for b in range(B)],
        thought_logprobs=[[t(-1.0) for _ in range(K)] for _ in range(B)],
        thought_truncated=torch.tensor([[b == 1, False] for b in range(B)]),
        answer_ids=[[[t(100 * b + 10 * k + m) for m in range(M)] for k in range(K)] for b in range(B)],
        answer_logprobs=[[[t(-2.0) for _ in range(M)] for _ in range(K)] for _ in range(B)],
        answer_truncated=torch.zeros(B, K, M, dtype=torch.bool).index_fill_(0, torch.tensor([2]), True),
        thought_texts=[[f"t{b}{k}" for k in range(K)] for b in range(B)],
        answer_texts=[[[f"a{b}{k}{m}" for m in range(M)] for k in range(K)] for b in range(B)],
        stats={"tokens_generated": 30.0},
    )


def test_select_slices_every_field_by_prompt_in_the_given_order():
    tree = _tree()
    sub = tree.select([2, 1])
    assert (sub.B, sub.K, sub.M) == (2, 2, 2)
    assert [p.tolist() for p in sub.prompt_ids] == [[2, 2], [1, 1]]
    assert [pv[0, 0].item() for pv in sub.pixel_values] == [2.0, 1.0]
    assert sub.thought_ids[0][1].tolist() == [21] and sub.answer_ids[1][0][1].tolist() == [101]
    assert sub.thought_truncated.tolist() == [[False, False], [True, False]]
    assert sub.answer_truncated[:, 0, 0].tolist() == [True, False]
    assert sub.thought_texts == [["t20", "t21"], ["t10", "t11"]] and sub.answer_texts[0][1] == ["a210", "a211"]
    assert sub.stats == {"tokens_generated": 30.0} and sub.stats is not tree.stats
    assert tree.select([0], keep_stats=False).stats == {}
    # every field of the type was sliced: nothing still has the whole tree's B
    for f in dataclasses.fields(TreeRollout):
        v = getattr(sub, f.name)
        if isinstance(v, list) or torch.is_tensor(v):
            assert len(v) == 2, f.name


def test_select_refuses_a_field_it_does_not_know_how_to_slice():
    tree = _tree()
    object.__setattr__(tree, "stats", {"x": 1.0})
    tree.thought_texts = ("not", "a", "list")  # a kind of value select has no rule for
    with pytest.raises(TypeError, match="thought_texts"):
        tree.select([0])
