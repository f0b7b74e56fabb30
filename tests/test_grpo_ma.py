"""The whole GRPO-MA objective (``algorithms/grpo_ma.py``) on one small tree, worked by hand.

The tree: B = 1 prompt, K = 2 thoughts, M = 2 answers per thought; thought lengths T = [2, 1],
answer lengths A = [[1, 2], [1, 1]]; N = 8 trained tokens, canonical order::

    th0 th0 | a00 | a01 a01 | th1 | a10 | a11

Rewards r = [[1, 0], [0, 0]]: thought values V = [0.5, 0] (mean 0.25, std 0.25), so with
``adv_eps = 0`` A^T = [1, -1]; the four answers' rewards have mean 0.25 and std sqrt(3)/4, so
A^A = [sqrt(3), -1/sqrt(3), -1/sqrt(3), -1/sqrt(3)].
"""

from __future__ import annotations

import math

import pytest
import torch

from vlm_grpo_ma.algorithms.grpo_ma import (
    ObjectiveSettings,
    grpo_ma_objective,
    old_logp_for_loss,
    overlong_penalty,
    policy_loss,
    segment_weights,
    token_terms,
    trained_tokens,
    tree_advantages,
)

R3 = math.sqrt(3.0)
T = torch.tensor([[2, 1]])
A = torch.tensor([[[1, 2], [1, 1]]])
REWARDS = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
NO_TRUNC_T, NO_TRUNC_A = torch.zeros(1, 2, dtype=torch.bool), torch.zeros(1, 2, 2, dtype=torch.bool)
S = ObjectiveSettings(adv_eps=0.0, loss_options=dict(clip_low=0.2, clip_high=0.2))
#: the token advantages by hand, canonical order
ADV = [1.0, 1.0, R3, -1 / R3, -1 / R3, -1.0, -1 / R3, -1 / R3]


def test_step1_advantages_by_hand():
    adv = tree_advantages(S, REWARDS, T, A)
    torch.testing.assert_close(adv.thought, torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(adv.answer, torch.tensor([[[R3, -1 / R3], [-1 / R3, -1 / R3]]]))
    assert adv.penalty is None
    # no std division: the centred values
    flat = tree_advantages(ObjectiveSettings(scale_rewards="none"), REWARDS, T, A)
    torch.testing.assert_close(flat.thought, torch.tensor([[0.25, -0.25]]))
    torch.testing.assert_close(flat.answer, torch.tensor([[[0.75, -0.25], [-0.25, -0.25]]]))


def test_step1_overlong_punishment_by_hand():
    """Budgets 2 / 2, cache 1: a segment of 2 tokens gets -1, of 1 token 0. Penalised rewards
    [[0 - 1 + 0, 0 - 1 - 1], [0, 0]] = [[-1, -2], [0, 0]]: V = [-1.5, 0] -> A^T = [-1, 1];
    answers' mean -0.75, std sqrt(0.6875)."""
    s = ObjectiveSettings(adv_eps=0.0, overlong_cache=1, max_thought_tokens=2, max_answer_tokens=2)
    torch.testing.assert_close(overlong_penalty(s, T, A), torch.tensor([[[-1.0, -2.0], [0.0, 0.0]]]))
    adv = tree_advantages(s, REWARDS, T, A)
    torch.testing.assert_close(adv.penalty, torch.tensor([[[-1.0, -2.0], [0.0, 0.0]]]))
    torch.testing.assert_close(adv.thought, torch.tensor([[-1.0, 1.0]]))
    pen = torch.tensor([0.0, -2.0, 0.0, 0.0])
    std = math.sqrt(((pen + 0.5) ** 2).mean().item())
    torch.testing.assert_close(adv.answer.flatten(), (pen + 0.5) / std)
    assert overlong_penalty(ObjectiveSettings(), T, A) is None


def test_step2_weights_by_hand():
    w_t, w_a = segment_weights(S, T, A, NO_TRUNC_T, NO_TRUNC_A)
    torch.testing.assert_close(w_t, torch.full((1, 2), 1 / 8))
    torch.testing.assert_close(w_a, torch.full((1, 2, 2), 1 / 8))
    # seq-mean-token-mean: 4 paths of lengths T_k / M + A_km = 2, 3, 1.5, 1.5
    s = ObjectiveSettings(loss_agg_mode="seq-mean-token-mean")
    w_t, w_a = segment_weights(s, T, A, NO_TRUNC_T, NO_TRUNC_A)
    torch.testing.assert_close(w_a, torch.tensor([[[1 / 8, 1 / 12], [1 / 6, 1 / 6]]]))
    torch.testing.assert_close(w_t, torch.tensor([[(1 / 8 + 1 / 12) / 2, (1 / 6 + 1 / 6) / 2]]))
    # overlong filtering: thought 0 and answer 01 truncated -> th0 and a01 out, 4 tokens left
    t_trunc, a_trunc = torch.tensor([[True, False]]), torch.tensor([[[False, True], [False, False]]])
    s = ObjectiveSettings(mask_truncated=True)
    assert trained_tokens(s, T, A, t_trunc, a_trunc) == 4.0
    assert trained_tokens(S, T, A, t_trunc, a_trunc) == 8.0  # filtering off: every token trains
    w_t, w_a = segment_weights(s, T, A, t_trunc, a_trunc)
    torch.testing.assert_close(w_t, torch.tensor([[0.0, 0.25]]))
    torch.testing.assert_close(w_a, torch.tensor([[[0.25, 0.0], [0.25, 0.25]]]))
    # two ranks holding 8 and 24 tokens, 2 accumulation steps: 1/8 * (2 * 2 * 8 / 32) = 1/8
    w_t, _ = segment_weights(S, T, A, NO_TRUNC_T, NO_TRUNC_A, global_tokens=32.0, world_size=2, grad_accum=2)
    torch.testing.assert_close(w_t, torch.full((1, 2), 1 / 8))
    # path modes: only the accumulation factor (every rank holds the same number of paths)
    s = ObjectiveSettings(loss_agg_mode="seq-mean-token-sum")
    w_t, w_a = segment_weights(s, T, A, NO_TRUNC_T, NO_TRUNC_A, global_tokens=32.0, world_size=2, grad_accum=2)
    torch.testing.assert_close(w_a, torch.full((1, 2, 2), 2 / 4))


def test_step3_token_terms_by_hand():
    adv = tree_advantages(S, REWARDS, T, A)
    w_t, w_a = segment_weights(S, T, A, NO_TRUNC_T, NO_TRUNC_A)
    terms = token_terms(S, adv.thought, adv.answer, w_t, w_a, T, A)
    torch.testing.assert_close(terms.advantages, torch.tensor(ADV))
    torch.testing.assert_close(terms.weights, torch.full((8,), 1 / 8))
    assert terms.seq_ids is None and terms.tis == {}
    # sequence level: every segment its own sequence (M > 1)
    seq = token_terms(ObjectiveSettings(importance_sampling_level="sequence"), adv.thought, adv.answer, w_t, w_a, T, A)
    assert seq.seq_ids.tolist() == [0, 0, 1, 2, 2, 3, 4, 5]
    assert token_terms(ObjectiveSettings(policy_loss="vespo"), adv.thought, adv.answer, w_t, w_a, T, A).seq_ids is not None
    # TIS: min(exp(old - sampler), 2); a token the sampler did not score (NaN) keeps weight 1
    old = torch.zeros(8)
    sampler = torch.tensor([0.0, math.log(2.0), -math.log(4.0), float("nan"), 0.0, 0.0, 0.0, 0.0])
    tis = token_terms(ObjectiveSettings(tis_cap=2.0), adv.thought, adv.answer, w_t, w_a, T, A,
                      trainer_old_logp=old, rollout_logp=sampler)
    torch.testing.assert_close(tis.weights, torch.tensor([1, 0.5, 2, 1, 1, 1, 1, 1]) / 8)
    assert tis.tis["tis/capped"] == pytest.approx(1 / 8) and tis.tis["tis/mean"] == pytest.approx(8.5 / 8)
    with pytest.raises(ValueError, match="tis_cap"):
        token_terms(ObjectiveSettings(tis_cap=2.0), adv.thought, adv.answer, w_t, w_a, T, A)
    with pytest.raises(ValueError, match="thought_adv"):
        token_terms(S, adv.thought[:, :1], adv.answer, w_t, w_a, T, A)


def test_step4_old_logp():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    old = old_logp_for_loss(logp, None)
    assert torch.equal(old, logp) and not old.requires_grad  # on-policy: ratio 1, no gradient through it
    mine = torch.tensor([-1.5, -2.5])
    assert old_logp_for_loss(logp, mine) is mine
    assert ObjectiveSettings(ppo_epochs=2).needs_old_logp and ObjectiveSettings(tis_cap=1.5).needs_old_logp
    assert not ObjectiveSettings().needs_old_logp


def test_whole_objective_by_hand():
    """Steps 1-5 in one call, on-policy: loss = -(1/8) sum_t A_t = -(1 + sqrt(3) - 4/sqrt(3)) / 8,
    and d loss / d logp_t = -A_t / 8."""
    logp = torch.tensor([-1.0, -0.5, -2.0, -0.1, -0.3, -1.2, -0.7, -0.9], requires_grad=True)
    loss, metrics, adv, terms = grpo_ma_objective(S, REWARDS, T, A, logp)
    assert loss.item() == pytest.approx(-(1 + R3 - 4 / R3) / 8, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, -torch.tensor(ADV) / 8)
    assert metrics["ratio/mean"].item() == 1.0 and metrics["clip/high"].item() == 0.0
    torch.testing.assert_close(terms.advantages, torch.tensor(ADV))

    # off-policy (the trainer's old log-probs): token 0 (A = 1) at ratio 1.5 is clipped at 1.2
    # and gets no gradient; token 5 (A = -1) at ratio 0.5 is clipped at 0.8, no gradient either
    logp2 = logp.detach().clone().requires_grad_()
    old = logp.detach().clone()
    old[0] -= math.log(1.5)
    old[5] -= math.log(0.5)
    loss2, m2, _, _ = grpo_ma_objective(S, REWARDS, T, A, logp2, trainer_old_logp=old)
    pg = [-a for a in ADV]
    pg[0], pg[5] = -1.0 * 1.2, 1.0 * 0.8
    assert loss2.item() == pytest.approx(sum(pg) / 8, rel=1e-6)
    loss2.backward()
    expected = -torch.tensor(ADV) / 8
    expected[0] = expected[5] = 0.0
    torch.testing.assert_close(logp2.grad, expected)
    assert m2["clip/high"].item() == pytest.approx(1 / 8) and m2["clip/low"].item() == pytest.approx(1 / 8)


def test_policy_loss_uses_the_registered_loss_with_kl():
    """Step 5 with a reference: the clipped loss plus kl_coef * sum_t w_t k3_t (k3 = e^x - 1 - x,
    x = ref - logp): on-policy with ref = logp + log 2 on every token, k3 = 1 - log 2."""
    s = ObjectiveSettings(adv_eps=0.0, kl_coef=0.1)
    adv = tree_advantages(s, REWARDS, T, A)
    w_t, w_a = segment_weights(s, T, A, NO_TRUNC_T, NO_TRUNC_A)
    terms = token_terms(s, adv.thought, adv.answer, w_t, w_a, T, A)
    logp = torch.zeros(8, requires_grad=True)
    loss, metrics = policy_loss(s, logp, terms, ref_logp=torch.full((8,), math.log(2.0)))
    k3 = 1 - math.log(2.0)
    assert metrics["loss/kl"].item() == pytest.approx(0.1 * k3, rel=1e-6)
    assert loss.item() == pytest.approx(-(1 + R3 - 4 / R3) / 8 + 0.1 * k3, rel=1e-5)  # float32
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(s, logp, terms)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        ObjectiveSettings(loss_agg_mode="token_mean")
