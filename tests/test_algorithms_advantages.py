"""GRPO and GRPO-MA advantages: hand-computed values, a reference loop, M = 1 equals GRPO."""

import math

import pytest
import torch

from vlm_grpo_ma.algorithms import (
    get_adv_est,
    grpo_advantages,
    grpo_ma_advantages,
    standardize_groups,
    zero_spread_fraction,
)
from vlm_grpo_ma.algorithms.registry import ADV_ESTIMATORS, register_adv_est

S6 = math.sqrt(6.0)  # 1 / population std of [0.5, 1, 0]


def test_grpo_hand_values():
    # rewards [1, 0, 1, 1]: mean 0.75, population std sqrt(3)/4
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), eps=0.0)
    s = math.sqrt(3.0) / 4.0
    expected = torch.tensor([0.25 / s, -0.75 / s, 0.25 / s, 0.25 / s])
    torch.testing.assert_close(adv, expected)


def test_grpo_unbiased_and_no_std_and_eps():
    r = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    # unbiased std: sqrt(0.75 * 0.25 * 4 / 3) = 0.5
    torch.testing.assert_close(grpo_advantages(r, unbiased=True, eps=0.0), torch.tensor([[0.5, -1.5, 0.5, 0.5]]))
    torch.testing.assert_close(grpo_advantages(r, scale_by_std=False), torch.tensor([[0.25, -0.75, 0.25, 0.25]]))
    # eps is added to the std: rewards [0, 2] -> std 1, eps 1 -> +-0.5
    torch.testing.assert_close(grpo_advantages(torch.tensor([0.0, 2.0]), eps=1.0), torch.tensor([-0.5, 0.5]))


def test_grpo_ma_hand_values():
    # prompt with K = 3 thoughts, M = 2 answers
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    thought, answer = grpo_ma_advantages(r, eps=0.0)
    # V = [0.5, 1, 0]: mean 0.5, population std 1/sqrt(6)
    torch.testing.assert_close(thought, torch.tensor([0.0, S6 / 2, -S6 / 2]))
    # six rewards, mean 0.5, std 0.5 -> +-1
    torch.testing.assert_close(answer, torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]]))


def test_grpo_ma_batched_hand_values_and_shapes():
    r = torch.tensor(
        [
            [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]],
            [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]],  # all equal -> zeros
        ]
    )
    thought, answer = grpo_ma_advantages(r, eps=0.0)
    assert thought.shape == (2, 3) and answer.shape == (2, 3, 2)
    torch.testing.assert_close(thought[0], torch.tensor([0.0, S6 / 2, -S6 / 2]))
    assert torch.equal(thought[1], torch.zeros(3)) and torch.equal(answer[1], torch.zeros(3, 2))


def test_thought_values_equal_but_answers_differ():
    # every thought has value 0.5, so thought advantages are 0 while answers are not
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    thought, answer = grpo_ma_advantages(r, eps=0.0)
    assert torch.equal(thought, torch.zeros(2))
    torch.testing.assert_close(answer, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 1.0 / 3.0, -7.25])
def test_all_equal_groups_are_exactly_zero(value):
    r = torch.full((2, 5, 3), value)
    thought, answer = grpo_ma_advantages(r)
    assert torch.equal(thought, torch.zeros(2, 5)) and torch.equal(answer, torch.zeros(2, 5, 3))
    assert torch.equal(grpo_advantages(torch.full((3, 7), value)), torch.zeros(3, 7))
    assert torch.equal(grpo_advantages(torch.full((3, 7), value), unbiased=True), torch.zeros(3, 7))
    # a group of one value
    assert torch.equal(grpo_advantages(torch.tensor([[value]]), unbiased=True), torch.zeros(1, 1))


def _reference_standardize(values, scale_by_std, eps, unbiased):
    n = len(values)
    mean = sum(values) / n
    if len(set(values)) == 1:
        return [0.0] * n
    var = sum((v - mean) ** 2 for v in values) / ((n - 1) if (unbiased and n > 1) else n)
    denom = (math.sqrt(var) + eps) if scale_by_std else 1.0
    return [(v - mean) / denom for v in values]


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("unbiased", [False, True])
def test_grpo_ma_matches_reference_loop(scale_by_std, unbiased):
    gen = torch.Generator().manual_seed(0)
    b, k, m = 6, 4, 3
    r = torch.randint(0, 3, (b, k, m), generator=gen).double() / 2  # ties and all-equal groups happen
    r[0] = 1.0
    thought, answer = grpo_ma_advantages(r, scale_by_std=scale_by_std, eps=1e-6, unbiased=unbiased)
    for bi in range(b):
        values = [sum(r[bi, ki, mi].item() for mi in range(m)) / m for ki in range(k)]
        ref_t = _reference_standardize(values, scale_by_std, 1e-6, unbiased)
        flat = [r[bi, ki, mi].item() for ki in range(k) for mi in range(m)]
        ref_a = _reference_standardize(flat, scale_by_std, 1e-6, unbiased)
        for ki in range(k):
            assert thought[bi, ki].item() == pytest.approx(ref_t[ki], abs=1e-9)
            for mi in range(m):
                assert answer[bi, ki, mi].item() == pytest.approx(ref_a[ki * m + mi], abs=1e-9)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_m1_grpo_ma_is_grpo(scale_by_std):
    gen = torch.Generator().manual_seed(1)
    r = torch.rand(5, 16, generator=gen)
    r[2] = 0.3
    grpo = grpo_advantages(r, scale_by_std=scale_by_std)
    thought, answer = grpo_ma_advantages(r.unsqueeze(-1), scale_by_std=scale_by_std)
    assert torch.equal(thought, grpo) and torch.equal(answer.squeeze(-1), grpo)
    t1, a1 = grpo_ma_advantages(r[0].unsqueeze(-1), scale_by_std=scale_by_std)  # unbatched [K, 1]
    assert torch.equal(t1, grpo[0]) and torch.equal(a1.squeeze(-1), grpo[0])


def test_integer_rewards_and_shape_errors():
    thought, answer = grpo_ma_advantages(torch.tensor([[1, 0], [1, 1], [0, 0]]), eps=0.0)
    assert thought.dtype == torch.float32
    torch.testing.assert_close(thought, torch.tensor([0.0, S6 / 2, -S6 / 2]))
    with pytest.raises(ValueError):
        grpo_ma_advantages(torch.zeros(4))
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError):
        standardize_groups(torch.zeros(3))


def test_registry():
    assert get_adv_est("grpo_ma") is grpo_ma_advantages
    r = torch.tensor([[[1.0], [0.0], [1.0], [1.0]]])
    t, a = get_adv_est("grpo")(r)
    torch.testing.assert_close(t, grpo_advantages(r[..., 0]))
    torch.testing.assert_close(a[..., 0], t)
    with pytest.raises(ValueError, match="M = 1"):
        get_adv_est("grpo")(torch.zeros(1, 4, 2))
    with pytest.raises(KeyError, match="grpo_ma"):
        get_adv_est("no-such-estimator")
    with pytest.raises(ValueError, match="already registered"):
        register_adv_est("grpo_ma")(lambda rewards: rewards)
    assert "grpo" in ADV_ESTIMATORS.names()


def test_zero_spread_fraction():
    r = torch.tensor(
        [
            [[1.0, 1.0], [1.0, 1.0]],  # constant
            [[1.0, 0.0], [0.0, 1.0]],  # spread (thought values equal, though)
            [[0.0, 0.0], [0.0, 0.0]],  # constant
            [[0.2, 0.2], [0.2, 0.3]],
        ]
    )
    assert zero_spread_fraction(r) == 0.5
    assert zero_spread_fraction(r.mean(-1)) == 0.75  # thought level
    assert zero_spread_fraction(torch.tensor([1.0, 1.0])) == 1.0
    assert zero_spread_fraction(torch.tensor([1.0, 0.0])) == 0.0
    assert zero_spread_fraction(torch.zeros(0, 4)) == 0.0
