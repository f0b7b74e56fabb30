"""The 2025-26 objective variants on a tree at M > 1, worked by hand: sequence ids (a sequence is a
segment), GSPO / CISPO / SAPO / VESPO losses and their gradients, overlong filtering and its
aggregation, the soft overlong punishment, batch-level advantage scaling.

The tree of every loss test: B = 1, K = 2, M = 2, thought lengths [2, 1], answer lengths
[[1, 2], [1, 0]]; canonical token order thought 0 (2 tokens), answer 00 (1), answer 01 (2),
thought 1 (1), answer 10 (1), answer 11 (none): N = 7.
"""

import math

import pytest
import torch

from vlm_grpo_ma.algorithms import (
    get_policy_loss,
    grpo_ma_advantages,
    kept_aggregation_weights,
    segment_mean,
    soft_overlong_penalty,
    tree_overlong_penalty,
    tree_sequence_ids,
    truncation_keep,
)

T_LENS = torch.tensor([[2, 1]])
A_LENS = torch.tensor([[[1, 2], [1, 0]]])
#: log pi_theta - log pi_old per token; sequence means: thought0 0.2, a00 -0.2, a01 0.2, thought1 0.5, a10 -0.1
LOG_RATIO = [0.1, 0.3, -0.2, 0.4, 0.0, 0.5, -0.1]
OLD = [-1.0, -2.0, -0.5, -1.5, -0.7, -3.0, -0.2]
#: thought0 +1, a00 -1, a01 +0.5, thought1 -1, a10 +2
ADV = torch.tensor([1.0, 1.0, -1.0, 0.5, 0.5, -1.0, 2.0], dtype=torch.float64)
W = torch.full((7,), 1 / 7, dtype=torch.float64)
SEQ_OF_TOKEN = [0, 0, 1, 2, 2, 3, 4]  # thought0, a00, a01 (x2), thought1, a10
SEQ_MEAN = [0.2, -0.2, 0.2, 0.5, -0.1]
SEQ_SUM = [0.4, -0.2, 0.4, 0.5, -0.1]
SEQ_LEN = [2, 1, 2, 1, 1]


def close(t, expected):
    return torch.allclose(t.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def _inputs():
    old = torch.tensor(OLD, dtype=torch.float64)
    logp = (old + torch.tensor(LOG_RATIO, dtype=torch.float64)).requires_grad_(True)
    return logp, old


def test_tree_sequence_ids_are_segments_and_paths_at_m1():
    assert tree_sequence_ids(T_LENS, A_LENS).tolist() == [0, 0, 1, 2, 2, 3, 4]
    # M = 1: a thought and its only answer are one completion, one sequence
    assert tree_sequence_ids(torch.tensor([[2, 1]]), torch.tensor([[[1], [2]]])).tolist() == [0, 0, 0, 1, 1, 1]
    # two prompts: ids keep counting
    ids = tree_sequence_ids(torch.tensor([[1], [1]]), torch.tensor([[[1, 1]], [[2, 0]]]))
    assert ids.tolist() == [0, 1, 2, 3, 4, 4]


def test_segment_mean_counts_only_masked_tokens():
    ids = torch.tensor([0, 0, 1, 1, 1])
    x = torch.tensor([1.0, 3.0, 2.0, 4.0, 9.0])
    assert segment_mean(x, ids).tolist() == [2.0, 2.0, 5.0, 5.0, 5.0]
    keep = torch.tensor([True, True, True, True, False])
    assert segment_mean(x, ids, keep).tolist() == [2.0, 2.0, 3.0, 3.0, 3.0]


def test_gspo_tree_loss_and_gradient_by_hand():
    logp, old = _inputs()
    ids = tree_sequence_ids(T_LENS, A_LENS)
    loss, m = get_policy_loss("clipped")(logp, old, ADV, W, clip_low=0.1, clip_high=0.1, seq_ids=ids)
    # per sequence: s = exp(mean log-ratio), l = max(-A s, -A clip(s, 0.9, 1.1))
    # thought0 s=1.2214 A=+1 -> -1.1 (clipped); a00 s=0.8187 A=-1 -> 0.9 (clipped);
    # a01 s=1.2214 A=0.5 -> -0.55 (clipped); thought1 s=1.6487 A=-1 -> 1.6487; a10 s=0.9048 A=2 -> -1.8097
    s = [math.exp(v) for v in SEQ_MEAN]
    expected = (2 * -1.1 + 0.9 + 2 * -0.55 + s[3] - 2 * s[4]) / 7
    assert float(loss) == pytest.approx(expected, abs=1e-12)
    loss.backward()
    # clipped sequences: no gradient; unclipped: d/dlogp_t (-A s) = -A s / |seq|, times w = 1/7
    grad = [0.0, 0.0, 0.0, 0.0, 0.0, s[3] / 7, -2 * s[4] / 7]
    assert logp.grad.tolist() == pytest.approx(grad, abs=1e-12)
    # metrics: 5 of 7 tokens in clipped sequences (3 high: thought0 and a01; 1 low: a00)
    assert float(m["clip/high"]) == pytest.approx(4 / 7) and float(m["clip/low"]) == pytest.approx(1 / 7)


def test_tree_sequence_is_not_the_path():
    """At M > 1 the thought's ratio is its own: grouping each thought with its answers into one
    sequence (what the M = 1 merge would do) gives another loss on the same tokens."""
    logp, old = _inputs()
    seg = get_policy_loss("clipped")(logp, old, ADV, W, clip_low=0.1, clip_high=0.1,
                                     seq_ids=tree_sequence_ids(T_LENS, A_LENS))[0]
    one_per_thought = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    other = get_policy_loss("clipped")(logp, old, ADV, W, clip_low=0.1, clip_high=0.1, seq_ids=one_per_thought)[0]
    assert float(seg) != pytest.approx(float(other), abs=1e-6)


def test_cispo_token_level_by_hand():
    logp, old = _inputs()
    loss, m = get_policy_loss("cispo")(logp, old, ADV, W, cap=1.2)
    rho = [min(math.exp(v), 1.2) for v in LOG_RATIO]
    lp = [o + v for o, v in zip(OLD, LOG_RATIO)]
    expected = sum(-r * a * x for r, a, x in zip(rho, ADV.tolist(), lp)) / 7
    assert float(loss) == pytest.approx(expected, abs=1e-12)
    loss.backward()
    # the weight is detached: every token keeps a REINFORCE gradient -w_IS A / 7 (no token zeroed)
    assert logp.grad.tolist() == pytest.approx([-r * a / 7 for r, a in zip(rho, ADV.tolist())], abs=1e-12)
    # capped: rho = 1.35, 1.49, 1.65 (3 of 7)
    assert float(m["clip/high"]) == pytest.approx(3 / 7) and float(m["clip/low"]) == 0.0


def test_cispo_sequence_level_by_hand():
    logp, old = _inputs()
    loss, _ = get_policy_loss("cispo")(logp, old, ADV, W, cap=1.3, seq_ids=tree_sequence_ids(T_LENS, A_LENS))
    loss.backward()
    w = [min(math.exp(SEQ_MEAN[s]), 1.3) for s in SEQ_OF_TOKEN]
    assert logp.grad.tolist() == pytest.approx([-wi * a / 7 for wi, a in zip(w, ADV.tolist())], abs=1e-12)


def test_sapo_sequence_level_by_hand():
    logp, old = _inputs()
    loss, _ = get_policy_loss("sapo")(logp, old, ADV, W, tau_pos=1.0, tau_neg=2.0,
                                      seq_ids=tree_sequence_ids(T_LENS, A_LENS))
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected, grad = 0.0, []
    for t, s_id in enumerate(SEQ_OF_TOKEN):
        a = ADV[t].item()
        tau = 1.0 if a > 0 else 2.0
        s = math.exp(SEQ_MEAN[s_id])
        expected += -4 / tau * sig(tau * (s - 1)) * a / 7
    # d/dlogp_t: every token u of t's sequence contributes -4 sig'(tau(s-1)) s a / |seq| / 7
    for t, s_id in enumerate(SEQ_OF_TOKEN):
        a = ADV[t].item()
        tau = 1.0 if a > 0 else 2.0
        s = math.exp(SEQ_MEAN[s_id])
        z = sig(tau * (s - 1))
        grad.append(SEQ_LEN[s_id] * (-4 * z * (1 - z) * s * a) / SEQ_LEN[s_id] / 7)
    assert float(loss) == pytest.approx(expected, abs=1e-12)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx(grad, abs=1e-12)
    # on-policy (ratio 1) the gate's gradient is the plain policy gradient -A w
    logp2 = old.clone().requires_grad_(True)
    get_policy_loss("sapo")(logp2, old, ADV, W)[0].backward()
    assert logp2.grad.tolist() == pytest.approx((-ADV / 7).tolist(), abs=1e-12)


def test_vespo_sequence_sum_by_hand():
    logp, old = _inputs()
    loss, m = get_policy_loss("vespo")(logp, old, ADV, W, seq_ids=tree_sequence_ids(T_LENS, A_LENS))
    phi = []
    for t, s_id in enumerate(SEQ_OF_TOKEN):
        k, lam = (2.0, 3.0) if ADV[t] >= 0 else (3.0, 2.0)
        lw = SEQ_SUM[s_id]  # a SUM of the token log-ratios
        phi.append(math.exp(lam + k * lw - lam * math.exp(lw)))
    lp = [o + v for o, v in zip(OLD, LOG_RATIO)]
    assert float(loss) == pytest.approx(sum(-p * a * x for p, a, x in zip(phi, ADV.tolist(), lp)) / 7, abs=1e-12)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-p * a / 7 for p, a in zip(phi, ADV.tolist())], abs=1e-12)
    assert float(m["vespo/phi_mean"]) == pytest.approx(sum(phi) / 7)


def test_loss_input_checks():
    logp, old = _inputs()
    with pytest.raises(ValueError, match="seq_ids"):
        get_policy_loss("sapo")(logp, old, ADV, W, seq_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="cap"):
        get_policy_loss("cispo")(logp, old, ADV, W, cap=0.0)


# ----------------------------------------------------------------------------- overlong
def test_truncation_keep_per_segment():
    t = torch.tensor([[False, True, False]])
    a = torch.tensor([[[True, True], [False, True], [False, False]]])
    keep_t, keep_a = truncation_keep(t, a)
    # thought 0: every answer truncated -> out; thought 1: truncated itself -> out; thought 2 kept
    assert keep_t.tolist() == [[False, False, True]]
    assert keep_a.tolist() == [[[False, False], [True, False], [True, True]]]
    # M = 1: a truncated answer takes its path out (TRL's rule for one completion)
    keep_t, keep_a = truncation_keep(torch.tensor([[False, False]]), torch.tensor([[[True], [False]]]))
    assert keep_t.tolist() == [[False, True]] and keep_a.tolist() == [[[False], [True]]]


def test_kept_aggregation_weights_by_hand():
    keep_t = torch.tensor([[True, False]])
    keep_a = torch.tensor([[[True, False], [True, True]]])
    w_t, w_a = kept_aggregation_weights("token-mean", T_LENS, A_LENS, keep_t, keep_a)
    # kept tokens: thought0 (2) + a00 (1) + a10 (1) = 4
    assert close(w_t, [[0.25, 0.0]]) and close(w_a, [[[0.25, 0.0], [0.25, 0.25]]])  # a11: kept, no tokens
    w_t, w_a = kept_aggregation_weights("seq-mean-token-mean", T_LENS, A_LENS, keep_t, keep_a)
    # P = 4 paths still; kept path lengths T/M + A: (0,0) 1+1 = 2, (0,1) 1+0 = 1, (1,0) 0+1 = 1, (1,1) 0
    assert close(w_a, [[[1 / 8, 0.0], [1 / 4, 0.0]]])
    assert close(w_t, [[(1 / 8 + 1 / 4) / 2, 0.0]])


def test_soft_overlong_penalty_by_hand_and_as_trl():
    L = torch.tensor([0, 6, 7, 9, 10, 11])
    assert soft_overlong_penalty(L, 10, 4).tolist() == pytest.approx([0, 0, -0.25, -0.75, -1, -1])
    with pytest.raises(ValueError):
        soft_overlong_penalty(L, 10, 0)
    p = tree_overlong_penalty(torch.tensor([[4, 9]]), torch.tensor([[[2, 5], [6, 1]]]), 8, 6, 3, factor=0.5)
    # thought budget 8 (starts at 5): 4 -> 0, 9 -> -1; answer budget 6 (starts at 3): 2 -> 0, 5 -> -2/3, 6 -> -1, 1 -> 0
    assert close(p, [[[0.0, -1 / 3], [-1.0, -0.5]]])
    rewards = pytest.importorskip("trl.rewards")
    trl_fn = rewards.get_soft_overlong_punishment(10, 4)
    assert trl_fn([[1] * int(n) for n in L]) == pytest.approx(soft_overlong_penalty(L, 10, 4).tolist())


# ----------------------------------------------------------------------------- batch scaling
def test_batch_scaling_tree_by_hand():
    r = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 1.0]]])
    ta, aa = grpo_ma_advantages(r, eps=0.0, scale_rewards="batch")
    # thought values [[.5, 0], [1, .5]]: centred per prompt [[.25, -.25], [.25, -.25]], batch std of
    # all four values sqrt(0.125)
    assert close(ta, [[0.25 / math.sqrt(0.125), -0.25 / math.sqrt(0.125)]] * 2)
    # rewards: centred per prompt (means .25, .75), batch std of all 8 = 0.5
    assert close(aa, [[[1.5, -0.5], [-0.5, -0.5]], [[0.5, 0.5], [-1.5, 0.5]]])
    # group scaling gives other numbers, none no division
    ta_g, aa_g = grpo_ma_advantages(r, eps=0.0, scale_rewards="group")
    assert not torch.allclose(aa_g, aa)
    ta_n, aa_n = grpo_ma_advantages(r, scale_rewards="none")
    assert close(aa_n, [[[0.75, -0.25], [-0.25, -0.25]], [[0.25, 0.25], [-0.75, 0.25]]])
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_ma_advantages(r, scale_rewards="global")
