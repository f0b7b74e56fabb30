"""Aggregation weights, the clipped policy loss and the KL estimators.

The central check: with M = 1 the GRPO-MA loss (unique tokens, tree weights, thought and answer
advantages) and its gradients equal plain GRPO's on the same samples, for every aggregation mode,
against an independent implementation of verl-style ``agg_loss`` on a padded [G, T] batch.
"""

import math

import pytest
import torch

from vlm_grpo_ma.algorithms import (
    AGGREGATION_MODES,
    aggregation_weights,
    clipped_policy_loss,
    expand_to_paths,
    expand_to_tokens,
    get_kl_estimator,
    get_policy_loss,
    grpo_advantages,
    grpo_ma_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_clipped_policy_loss,
)

T_LENS = torch.tensor([[4, 2]])
A_LENS = torch.tensor([[[1, 3], [2, 2]]])


# ----------------------------------------------------------------------------- aggregation weights
def test_weights_token_mean_hand():
    w_t, w_a = aggregation_weights("token-mean", T_LENS, A_LENS, dtype=torch.float64)
    # 6 thought tokens + 8 answer tokens, each counted once
    assert torch.allclose(w_t, torch.full((1, 2), 1 / 14, dtype=torch.float64))
    assert torch.allclose(w_a, torch.full((1, 2, 2), 1 / 14, dtype=torch.float64))


def test_weights_seq_mean_token_mean_hand():
    w_t, w_a = aggregation_weights("seq-mean-token-mean", T_LENS, A_LENS, dtype=torch.float64)
    # P = 4 paths; L = T/M + A = [[2+1, 2+3], [1+2, 1+2]] = [[3, 5], [3, 3]]
    expected_a = torch.tensor([[[1 / 12, 1 / 20], [1 / 12, 1 / 12]]], dtype=torch.float64)
    expected_t = torch.tensor([[(1 / 12 + 1 / 20) / 2, (1 / 12 + 1 / 12) / 2]], dtype=torch.float64)
    assert torch.allclose(w_a, expected_a) and torch.allclose(w_t, expected_t)
    total = (w_t * T_LENS).sum() + (w_a * A_LENS).sum()
    assert total.item() == pytest.approx(1.0)


def test_weights_seq_mean_token_sum_and_norm_hand():
    w_t, w_a = aggregation_weights("seq-mean-token-sum", T_LENS, A_LENS, dtype=torch.float64)
    assert torch.allclose(w_t, torch.full((1, 2), 0.25, dtype=torch.float64))
    assert torch.allclose(w_a, torch.full((1, 2, 2), 0.25, dtype=torch.float64))
    # longest path: thought 0 (4) + answer 1 (3) = 7 -> 1 / (4 * 7)
    w_t, w_a = aggregation_weights("seq-mean-token-sum-norm", T_LENS, A_LENS, dtype=torch.float64)
    assert torch.allclose(w_t, torch.full((1, 2), 1 / 28, dtype=torch.float64))
    assert torch.allclose(w_a, torch.full((1, 2, 2), 1 / 28, dtype=torch.float64))
    w_t, _ = aggregation_weights("seq-mean-token-sum-norm", T_LENS, A_LENS, max_len=10, dtype=torch.float64)
    assert torch.allclose(w_t, torch.full((1, 2), 1 / 40, dtype=torch.float64))


def test_weights_errors_and_empty_paths():
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        aggregation_weights("mean", T_LENS, A_LENS)
    with pytest.raises(ValueError):
        aggregation_weights("token-mean", T_LENS, A_LENS[0])
    with pytest.raises(ValueError):
        aggregation_weights("token-mean", -T_LENS, A_LENS)
    w_t, w_a = aggregation_weights("seq-mean-token-mean", torch.tensor([[0, 2]]), torch.tensor([[[0], [2]]]))
    assert w_t[0, 0] == 0 and w_a[0, 0, 0] == 0 and w_a[0, 1, 0] == pytest.approx(1 / 8)


def test_expand_to_tokens_and_paths_hand():
    tv = torch.tensor([[10.0, 20.0]])
    av = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    tl = torch.tensor([[2, 1]])
    al = torch.tensor([[[1, 0], [2, 1]]])
    assert expand_to_tokens(tv, av, tl, al).tolist() == [10, 10, 1, 20, 3, 3, 4]
    values, mask = expand_to_paths(tv, av, tl, al)
    assert values.tolist() == [[10, 10, 1], [10, 10, 0], [20, 3, 3], [20, 4, 0]]
    assert mask.tolist() == [[True] * 3, [True, True, False], [True] * 3, [True, True, False]]
    with pytest.raises(ValueError):
        expand_to_paths(tv, av, tl, al, max_len=2)


# ----------------------------------------------------------------------------- clipped loss
def test_clipped_loss_hand_values_and_clip_fractions():
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0])
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5, 2.0])
    old = torch.zeros(5)
    logp = ratio.log().requires_grad_()
    w = torch.full((5,), 0.2)
    loss, metrics = clipped_policy_loss(logp, old, adv, w, clip_low=0.2, clip_high=0.2)
    # per token: max(-1.5, -1.2) = -1.2; max(0.5, 0.8) = 0.8; max(-0.5, -0.8) = -0.5; max(1.5, 1.2) = 1.5; 0
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.5 + 1.5) / 5)
    assert metrics["clip/high"].item() == pytest.approx(0.2)  # token 0
    assert metrics["clip/low"].item() == pytest.approx(0.2)  # token 1
    assert metrics["ratio/max"].item() == pytest.approx(2.0)
    assert metrics["ratio/min"].item() == pytest.approx(0.5)
    assert metrics["ratio/mean"].item() == pytest.approx((1.5 + 0.5 + 0.5 + 1.5 + 2.0) / 5)
    assert metrics["loss/policy"].item() == pytest.approx(loss.item())
    assert metrics["loss/kl"].item() == 0.0
    loss.backward()
    # d/dlogp of w * (-A * rho) is -w * A * rho on unclipped tokens, 0 on clipped ones
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, -0.2 * 0.5, 0.2 * 1.5, 0.0]))


def test_clip_higher_dapo():
    adv = torch.tensor([1.0, 1.0, -1.0])
    ratio = torch.tensor([1.25, 1.3, 0.75])
    logp = ratio.log()
    _, sym = clipped_policy_loss(logp, torch.zeros(3), adv, torch.ones(3) / 3, clip_low=0.2, clip_high=0.2)
    assert sym["clip/high"].item() == pytest.approx(2 / 3)
    assert sym["clip/low"].item() == pytest.approx(1 / 3)  # 0.75 < 1 - 0.2 with A < 0
    loss, dapo = clipped_policy_loss(logp, torch.zeros(3), adv, torch.ones(3) / 3, clip_low=0.2, clip_high=0.28)
    assert dapo["clip/high"].item() == pytest.approx(1 / 3)
    # token 0 unclipped (-1.25), token 1 clipped at 1.28, token 2: max(0.75, 0.8) = 0.8
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.8) / 3)


def test_zero_weight_tokens_are_not_counted():
    logp = torch.tensor([math.log(1.5), math.log(3.0)])
    loss, metrics = clipped_policy_loss(logp, torch.zeros(2), torch.ones(2), torch.tensor([1.0, 0.0]))
    assert metrics["clip/high"].item() == 1.0 and metrics["ratio/max"].item() == pytest.approx(1.5)
    assert loss.item() == pytest.approx(-1.2)


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([0.0]), torch.tensor([math.log(2.0)])  # log r = log 2
    assert kl_k1(logp, ref).item() == pytest.approx(-math.log(2.0))
    assert kl_k2(logp, ref).item() == pytest.approx(0.5 * math.log(2.0) ** 2)
    assert kl_k3(logp, ref).item() == pytest.approx(1.0 - math.log(2.0))
    assert kl_k3(torch.tensor([0.3]), torch.tensor([0.3])).item() == 0.0
    # clamp of the log-ratio before the exp
    assert kl_k3(torch.tensor([0.0]), torch.tensor([50.0]), clamp=10.0).item() == pytest.approx(math.exp(10) - 11)
    assert kl_k1(torch.tensor([0.0]), torch.tensor([-50.0]), clamp=10.0).item() == pytest.approx(10.0)
    assert get_kl_estimator("k3") is kl_k3
    # k3 >= 0 and is an unbiased KL estimate: E_{y~p}[k3] = KL(p || q)
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=gen, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=gen, dtype=torch.float64), 0)
    exact = (p * (p / q).log()).sum()
    assert (p * kl_k3(p.log(), q.log())).sum().item() == pytest.approx(exact.item())
    assert (p * kl_k1(p.log(), q.log())).sum().item() == pytest.approx(exact.item())


def test_loss_with_kl_term_hand():
    logp = torch.tensor([0.0, 0.0], requires_grad=True)
    ref = torch.tensor([math.log(2.0), 0.0])
    loss, metrics = clipped_policy_loss(
        logp, torch.zeros(2), torch.zeros(2), torch.full((2,), 0.5), ref_logp=ref, kl_coef=0.1
    )
    assert loss.item() == pytest.approx(0.1 * 0.5 * (1 - math.log(2.0)))
    assert metrics["kl/mean"].item() == pytest.approx(0.5 * (1 - math.log(2.0)))
    assert metrics["loss/kl"].item() == pytest.approx(loss.item())
    loss.backward()
    # d k3 / d logp = 1 - r = 1 - 2 at token 0
    torch.testing.assert_close(logp.grad, torch.tensor([0.1 * 0.5 * (1 - 2.0), 0.0]))
    with pytest.raises(ValueError, match="ref_logp"):
        clipped_policy_loss(logp, torch.zeros(2), torch.zeros(2), torch.ones(2), kl_coef=0.1)
    with pytest.raises(ValueError):
        clipped_policy_loss(logp, torch.zeros(3), torch.zeros(2), torch.ones(2))
    assert get_policy_loss("clipped") is clipped_policy_loss


# ----------------------------------------------------------------------------- M = 1 is GRPO
def _verl_agg_loss(loss_mat, mask, mode):
    """Independent aggregation of a padded [G, T] loss matrix (verl's agg_loss conventions)."""
    if mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    seq_sum = (loss_mat * mask).sum(-1)
    if mode == "seq-mean-token-mean":
        return (seq_sum / mask.sum(-1)).mean()
    if mode == "seq-mean-token-sum":
        return seq_sum.mean()
    if mode == "seq-mean-token-sum-norm":
        # verl: seq_sum.sum() / T; Dr.GRPO (and this package) also averages over the G sequences
        return seq_sum.sum() / mask.shape[-1] / mask.shape[0]
    raise ValueError(mode)


def _plain_grpo_loss(theta, old, ref, adv_rows, mask, mode, clip_low, clip_high, kl_coef):
    ratio = torch.exp(theta - old)
    a = adv_rows.unsqueeze(-1)
    pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    log_r = (ref - theta).clamp(-10, 10)
    kl = torch.exp(log_r) - 1 - log_r
    return _verl_agg_loss(pg + kl_coef * kl, mask, mode)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_m1_grpo_ma_loss_and_grad_equal_grpo(mode):
    gen = torch.Generator().manual_seed(3)
    b, k = 2, 4
    t_lens = torch.randint(1, 6, (b, k), generator=gen)
    a_lens = torch.randint(1, 4, (b, k, 1), generator=gen)
    lengths = (t_lens + a_lens[..., 0]).reshape(-1)  # [G]
    g, tmax = b * k, int(lengths.max()) + 2  # padded beyond the longest row
    mask = (torch.arange(tmax).unsqueeze(0) < lengths.unsqueeze(1)).double()  # [G, T]
    theta0 = torch.randn(g, tmax, generator=gen, dtype=torch.float64) * 0.3 - 2.0
    old = theta0 + torch.randn(g, tmax, generator=gen, dtype=torch.float64) * 0.3  # some tokens clip
    ref = theta0 + torch.randn(g, tmax, generator=gen, dtype=torch.float64) * 0.2
    rewards = torch.rand(b, k, generator=gen, dtype=torch.float64)
    kw = dict(clip_low=0.2, clip_high=0.28)

    # plain GRPO on the padded batch
    theta_a = theta0.clone().requires_grad_()
    adv_rows = grpo_advantages(rewards).reshape(-1)  # [G]
    loss_a = _plain_grpo_loss(theta_a, old, ref, adv_rows, mask, mode, kl_coef=0.05, **kw)
    loss_a.backward()

    # GRPO-MA with M = 1: unique tokens in tree order, thought and answer segments separately
    theta_b = theta0.clone().requires_grad_()
    keep = mask.bool()  # row-major order = for b, k: thought tokens then answer tokens
    adv_t, adv_a = grpo_ma_advantages(rewards.unsqueeze(-1))
    w_t, w_a = aggregation_weights(mode, t_lens, a_lens, max_len=tmax, dtype=torch.float64)
    adv = expand_to_tokens(adv_t, adv_a, t_lens, a_lens)
    w = expand_to_tokens(w_t, w_a, t_lens, a_lens)
    loss_b, metrics = clipped_policy_loss(
        theta_b[keep], old[keep], adv, w, ref_logp=ref[keep], kl_coef=0.05, **kw
    )
    loss_b.backward()

    assert metrics["clip/high"] + metrics["clip/low"] > 0  # the clip is exercised
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(theta_b.grad, theta_a.grad, rtol=1e-10, atol=1e-12)

    # the padded-batch convenience wrapper gives the same
    theta_c = theta0.clone().requires_grad_()
    loss_c, _ = masked_clipped_policy_loss(
        theta_c, old, adv_rows, mask, loss_agg_mode=mode, ref_logp=ref, kl_coef=0.05, **kw
    )
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(theta_c.grad, theta_a.grad, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- M > 1: definitions
def _reference_tree_loss(tok_loss_t, tok_loss_a, t_lens, a_lens, mode, max_len=None):
    """Python loops over the definition: tok_loss_t[b][k] / tok_loss_a[b][k][m] are lists of token losses."""
    b, k, m = a_lens.shape
    p = b * k * m
    if mode == "token-mean":
        total = sum(sum(tok_loss_t[i][j]) + sum(sum(tok_loss_a[i][j][n]) for n in range(m)) for i in range(b) for j in range(k))
        count = int(t_lens.sum() + a_lens.sum())
        return total / count
    if mode == "seq-mean-token-mean":
        acc = 0.0
        for i in range(b):
            for j in range(k):
                for n in range(m):
                    length = t_lens[i, j].item() / m + a_lens[i, j, n].item()
                    acc += (sum(tok_loss_t[i][j]) / m + sum(tok_loss_a[i][j][n])) / length
        return acc / p
    if mode == "seq-mean-token-sum":
        acc = sum(sum(tok_loss_t[i][j]) / m + sum(tok_loss_a[i][j][n]) for i in range(b) for j in range(k) for n in range(m))
        return acc / p
    if mode == "seq-mean-token-sum-norm":
        lmax = max_len or max(t_lens[i, j].item() + a_lens[i, j, n].item() for i in range(b) for j in range(k) for n in range(m))
        acc = sum(sum(tok_loss_t[i][j]) / m + sum(tok_loss_a[i][j][n]) for i in range(b) for j in range(k) for n in range(m))
        return acc / (p * lmax)
    raise ValueError(mode)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_tree_weights_match_reference_loop(mode):
    gen = torch.Generator().manual_seed(4)
    b, k, m = 2, 3, 4
    t_lens = torch.randint(1, 7, (b, k), generator=gen)
    a_lens = torch.randint(1, 5, (b, k, m), generator=gen)
    w_t, w_a = aggregation_weights(mode, t_lens, a_lens, dtype=torch.float64)
    n = int(t_lens.sum() + a_lens.sum())
    tok = torch.randn(n, generator=gen, dtype=torch.float64)
    w = expand_to_tokens(w_t, w_a, t_lens, a_lens)
    # split the flat token losses back into segments, in tree order
    pos = 0
    tl_t = [[None] * k for _ in range(b)]
    tl_a = [[[None] * m for _ in range(k)] for _ in range(b)]
    for i in range(b):
        for j in range(k):
            tl_t[i][j] = tok[pos : pos + t_lens[i, j]].tolist()
            pos += int(t_lens[i, j])
            for q in range(m):
                tl_a[i][j][q] = tok[pos : pos + a_lens[i, j, q]].tolist()
                pos += int(a_lens[i, j, q])
    assert pos == n
    assert (w * tok).sum().item() == pytest.approx(_reference_tree_loss(tl_t, tl_a, t_lens, a_lens, mode), rel=1e-12)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_unique_token_layout_equals_naive_layout(mode):
    """One row per path (thought repeated M times, thought weights / M) gives the same loss and gradient."""
    gen = torch.Generator().manual_seed(5)
    b, k, m = 2, 3, 4
    t_lens = torch.randint(1, 6, (b, k), generator=gen)
    a_lens = torch.randint(1, 4, (b, k, m), generator=gen)
    rewards = torch.randint(0, 2, (b, k, m), generator=gen).double()
    adv_t, adv_a = grpo_ma_advantages(rewards)
    w_t, w_a = aggregation_weights(mode, t_lens, a_lens, dtype=torch.float64)
    # per-token parameters: one per unique thought token, one per answer token
    thought_logp = torch.randn(b, k, int(t_lens.max()), generator=gen, dtype=torch.float64).requires_grad_()
    answer_logp = torch.randn(b, k, m, int(a_lens.max()), generator=gen, dtype=torch.float64).requires_grad_()

    def unique_tokens():
        parts = []
        for i in range(b):
            for j in range(k):
                parts.append(thought_logp[i, j, : t_lens[i, j]])
                for q in range(m):
                    parts.append(answer_logp[i, j, q, : a_lens[i, j, q]])
        return torch.cat(parts)

    def path_rows():
        rows = []
        for i in range(b):
            for j in range(k):
                for q in range(m):
                    rows.append(torch.cat([thought_logp[i, j, : t_lens[i, j]], answer_logp[i, j, q, : a_lens[i, j, q]]]))
        length = max(len(r) for r in rows)
        return torch.stack([torch.nn.functional.pad(r, (0, length - len(r))) for r in rows])

    flat = unique_tokens()
    old = flat.detach() + 0.2
    loss_u, _ = clipped_policy_loss(
        flat, old, expand_to_tokens(adv_t, adv_a, t_lens, a_lens), expand_to_tokens(w_t, w_a, t_lens, a_lens)
    )
    g_u = torch.autograd.grad(loss_u, (thought_logp, answer_logp))

    rows = path_rows()
    w_rows, mask = expand_to_paths(w_t / m, w_a, t_lens, a_lens)
    adv_rows, _ = expand_to_paths(adv_t, adv_a, t_lens, a_lens)
    old_rows = rows.detach() + 0.2
    loss_n, _ = clipped_policy_loss(rows[mask], old_rows[mask], adv_rows[mask], w_rows[mask])
    g_n = torch.autograd.grad(loss_n, (thought_logp, answer_logp))

    torch.testing.assert_close(loss_n, loss_u, rtol=1e-12, atol=1e-14)
    for a, c in zip(g_u, g_n):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-14)
