"""The training layout of a tree: packed (one row per thought, 4D mask, restarting positions)
equals naive (K*M rows, thought trained once) in per-token log-probs, loss and gradients, on the
three tiny Qwen-VL families with images; both equal the rollout's sampling log-probs; with M = 1
the loss and gradients equal plain GRPO's on the same completions."""

from __future__ import annotations

import pytest
import torch

from vlm_grpo_ma.algorithms import (
    AGGREGATION_MODES,
    aggregation_weights,
    clipped_policy_loss,
    grpo_advantages,
    grpo_ma_advantages,
    masked_clipped_policy_loss,
)
from vlm_grpo_ma.models import load_policy
from vlm_grpo_ma.rollout import HFRolloutBackend, SamplingParams, TreeRollout
from vlm_grpo_ma.rollout.layout import (
    _mask_for_attention,
    build_train_batch,
    packed_attention_mask,
    score_tokens,
)

from tests.test_rollout import FAMILIES, _messages, prompt_inputs


def _weights(tree, mode="token-mean", max_len=None):
    """The per-segment loss weights of ``tree`` under ``mode`` (what the trainer passes in)."""
    return aggregation_weights(mode, tree.thought_lengths(), tree.answer_lengths(), max_len)


@pytest.fixture(scope="module", params=FAMILIES)
def policy(request):
    return load_policy(request.param)


@pytest.fixture(scope="module")
def tree(policy):
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    sp = SamplingParams(max_thought_tokens=9, max_answer_tokens=5, seed=2)
    return backend.generate_tree(prompt_inputs(policy, _messages()), K=3, M=3, sampling=sp)


def _loss_and_grads(model, batch, old_logp, **kw):
    model.zero_grad(set_to_none=True)
    logp = score_tokens(model, batch)
    loss, _ = clipped_policy_loss(logp, old_logp, batch.advantages, batch.weights, clip_low=0.1, clip_high=0.3, **kw)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), loss.detach(), grads


def _perturbed_old(batch):
    """Old log-probs a little off the current policy, so some ratios clip."""
    g = torch.Generator().manual_seed(0)
    return batch.old_logp + 0.2 * torch.randn(batch.old_logp.shape, generator=g)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_packed_equals_naive(policy, tree, mode):
    rewards = torch.rand(2, 3, 3, generator=torch.Generator().manual_seed(1))
    t_adv, a_adv = grpo_ma_advantages(rewards)
    pad = policy.tokenizer.pad_token_id
    naive = build_train_batch(policy.model, tree, t_adv, a_adv, *_weights(tree, mode), layout="naive", pad_id=pad)
    packed = build_train_batch(policy.model, tree, t_adv, a_adv, *_weights(tree, mode), layout="packed", pad_id=pad)
    assert naive.input_ids.shape[0] == 2 * 3 * 3 and packed.input_ids.shape[0] == 2 * 3
    assert packed.attention_mask.shape == (6, 1, packed.input_ids.shape[1], packed.input_ids.shape[1])
    # same trained tokens, same order, same per-token values
    N = int(tree.thought_lengths().sum() + tree.answer_lengths().sum())
    assert naive.num_tokens == packed.num_tokens == N
    for f in ("targets", "is_thought", "old_logp", "advantages", "weights"):
        assert torch.equal(getattr(naive, f), getattr(packed, f)), f
    old = _perturbed_old(naive)
    lp_n, loss_n, g_n = _loss_and_grads(policy.model, naive, old)
    lp_p, loss_p, g_p = _loss_and_grads(policy.model, packed, old)
    torch.testing.assert_close(lp_p, lp_n, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_p, loss_n, atol=1e-6, rtol=1e-5)
    assert g_n.keys() == g_p.keys() and len(g_n) > 10
    for name in g_n:
        torch.testing.assert_close(g_p[name], g_n[name], atol=1e-6, rtol=1e-4, msg=name)
    # both equal the sampling log-probs of the rollout
    torch.testing.assert_close(lp_p, packed.old_logp, atol=1e-4, rtol=0)
    # each thought token is trained once: the weights of a token-mean loss sum to 1
    if mode == "token-mean":
        assert packed.weights.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert packed.weights[0].item() == pytest.approx(1.0 / N)


def test_all_aggregation_modes_packed_equals_naive():
    """Every aggregation mode, one family (the model forward is shared; only weights change)."""
    policy = load_policy("tiny-qwen2.5-vl")
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    tr = backend.generate_tree(prompt_inputs(policy, _messages()), K=2, M=3,
                               sampling=SamplingParams(max_thought_tokens=7, max_answer_tokens=4, seed=4))
    t_adv, a_adv = grpo_ma_advantages(torch.rand(2, 2, 3, generator=torch.Generator().manual_seed(3)))
    for mode in AGGREGATION_MODES:
        n = build_train_batch(policy.model, tr, t_adv, a_adv, *_weights(tr, mode), layout="naive")
        p = build_train_batch(policy.model, tr, t_adv, a_adv, *_weights(tr, mode), layout="packed")
        old = _perturbed_old(n)
        _, loss_n, g_n = _loss_and_grads(policy.model, n, old)
        _, loss_p, g_p = _loss_and_grads(policy.model, p, old)
        torch.testing.assert_close(loss_p, loss_n, atol=1e-6, rtol=1e-5, msg=mode)
        for name in g_n:
            torch.testing.assert_close(g_p[name], g_n[name], atol=1e-6, rtol=1e-4, msg=f"{mode} {name}")


def test_packed_equals_naive_eager_attention():
    policy = load_policy("tiny-qwen3-vl", attn_implementation="eager")
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    tr = backend.generate_tree(prompt_inputs(policy, _messages()), K=2, M=2,
                               sampling=SamplingParams(max_thought_tokens=6, max_answer_tokens=4, seed=9))
    t_adv, a_adv = grpo_ma_advantages(torch.rand(2, 2, 2, generator=torch.Generator().manual_seed(5)))
    n = build_train_batch(policy.model, tr, t_adv, a_adv, *_weights(tr), layout="naive")
    p = build_train_batch(policy.model, tr, t_adv, a_adv, *_weights(tr), layout="packed")
    with torch.no_grad():
        torch.testing.assert_close(score_tokens(policy.model, p), score_tokens(policy.model, n), atol=1e-5, rtol=0)
        torch.testing.assert_close(score_tokens(policy.model, p), p.old_logp, atol=1e-4, rtol=0)


def test_m1_equals_plain_grpo(policy):
    """M = 1: the tree loss (packed layout, GRPO-MA advantages) and its gradients equal plain
    GRPO's: one right-padded completion per row scored by the model's own forward, GRPO
    advantages, ``masked_clipped_policy_loss`` (verl-style [G, T] aggregation)."""
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    tr = backend.generate_tree(prompt_inputs(policy, _messages()), K=4, M=1,
                               sampling=SamplingParams(max_thought_tokens=7, max_answer_tokens=4, seed=6))
    rewards = torch.tensor([[0.1, 0.9, 0.4, 0.4], [1.0, 0.0, 0.5, 0.2]])
    t_adv, a_adv = grpo_ma_advantages(rewards[..., None])
    adv = grpo_advantages(rewards)  # [B, G]
    torch.testing.assert_close(t_adv, adv)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        batch = build_train_batch(policy.model, tr, t_adv, a_adv, *_weights(tr, mode), layout="packed")
        old = _perturbed_old(batch)
        _, loss_tree, g_tree = _loss_and_grads(policy.model, batch, old)

        # plain GRPO: G = B*K completions (thought + answer), each scored from prompt + completion
        policy.model.zero_grad(set_to_none=True)
        comps = [torch.cat([tr.thought_ids[b][k], tr.answer_ids[b][k][0]]) for b in range(2) for k in range(4)]
        T = max(len(c) for c in comps)
        logp = torch.zeros(8, T)
        mask = torch.zeros(8, T, dtype=torch.bool)
        old_mat = torch.zeros(8, T)
        off = 0
        for g, c in enumerate(comps):
            b = g // 4
            seq = torch.cat([tr.prompt_ids[b], c])[None]
            mm = torch.cat([tr.prompt_mm_token_type_ids[b], torch.zeros(len(c), dtype=torch.long)])[None]
            logits = policy.model(input_ids=seq, mm_token_type_ids=mm, pixel_values=tr.pixel_values[b],
                                  image_grid_thw=tr.image_grid_thw[b]).logits[0]
            lp = torch.log_softmax(logits[:-1].float(), -1).gather(-1, seq[0, 1:, None])[:, 0]
            logp = logp.index_put((torch.tensor([g]), torch.arange(len(c))), lp[-len(c):])
            mask[g, : len(c)] = True
            old_mat[g, : len(c)] = old[off : off + len(c)]
            off += len(c)
        adv_mat = adv.reshape(8, 1).expand(8, T)
        loss_grpo, _ = masked_clipped_policy_loss(logp, old_mat, adv_mat, mask, loss_agg_mode=mode,
                                                  clip_low=0.1, clip_high=0.3)
        loss_grpo.backward()
        torch.testing.assert_close(loss_tree, loss_grpo.detach(), atol=1e-6, rtol=1e-5, msg=mode)
        for name, p in policy.model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(g_tree[name], p.grad, atol=1e-6, rtol=1e-4, msg=f"{mode} {name}")


def _text_tree() -> TreeRollout:
    """A hand-made text-only tree: B=1 prompt of 3 tokens, K=1 thought of 2, M=2 answers of 2 and 1."""
    t = lambda *x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    f = lambda *x: torch.tensor(x, dtype=torch.float)  # noqa: E731
    return TreeRollout(
        prompt_ids=[t(5, 6, 7)], prompt_mm_token_type_ids=[t(0, 0, 0)], pixel_values=[None], image_grid_thw=[None],
        thought_ids=[[t(8, 9)]], thought_logprobs=[[f(-1.0, -2.0)]], thought_truncated=torch.tensor([[False]]),
        answer_ids=[[[t(10, 11), t(12)]]], answer_logprobs=[[[f(-3.0, -4.0), f(-5.0)]]],
        answer_truncated=torch.tensor([[[False, False]]]),
    )


def test_packed_positions_and_targets_by_hand():
    policy = load_policy("tiny-qwen2-vl")
    tr = _text_tree()
    p = build_train_batch(policy.model, tr, torch.tensor([[0.5]]), torch.tensor([[[1.0, -1.0]]]), *_weights(tr), pad_id=0)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    # positions restart for each answer at the thought's end (text: the same on all 3 rows)
    assert p.position_ids[:, 0].tolist() == [[0, 1, 2, 3, 4, 5, 6, 5]] * 3
    # thought tokens predicted from positions 2,3; answer 0 from 4 (</think> slot), 5; answer 1 from 4
    assert p.logit_cols.tolist() == [2, 3, 4, 5, 4]
    assert p.targets.tolist() == [8, 9, 10, 11, 12]
    assert p.is_thought.tolist() == [True, True, False, False, False]
    assert p.old_logp.tolist() == [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert p.advantages.tolist() == [0.5, 0.5, 1.0, 1.0, -1.0]
    assert p.weights.tolist() == pytest.approx([0.2] * 5)
    n = build_train_batch(policy.model, tr, torch.tensor([[0.5]]), torch.tensor([[[1.0, -1.0]]]), *_weights(tr), layout="naive", pad_id=0)
    assert n.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 12, 0]]
    assert n.attention_mask.tolist() == [[1] * 7, [1] * 6 + [0]]
    assert n.logit_rows.tolist() == [0, 0, 0, 0, 1] and n.logit_cols.tolist() == [2, 3, 4, 5, 4]
    with torch.no_grad():
        torch.testing.assert_close(score_tokens(policy.model, p), score_tokens(policy.model, n), atol=1e-5, rtol=0)


def test_packed_attention_mask_by_hand():
    seg = torch.tensor([[-1, -1, 0, 0, 1, -2]])
    m = packed_attention_mask(seg)[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # answer 1 sees the prefix and itself, not answer 0
        [0, 0, 0, 0, 0, 1],  # padding sees only itself
    ]


def test_bad_inputs_and_unsupported_attention():
    policy = load_policy("tiny-qwen2-vl")
    tr = _text_tree()
    with pytest.raises(ValueError, match="thought_adv"):
        build_train_batch(policy.model, tr, torch.zeros(2, 1), torch.zeros(1, 1, 2), *_weights(tr))
    with pytest.raises(ValueError, match="layout"):
        build_train_batch(policy.model, tr, torch.zeros(1, 1), torch.zeros(1, 1, 2), *_weights(tr), layout="tree")
    with pytest.raises(ValueError, match="thought_weights"):
        build_train_batch(policy.model, tr, torch.zeros(1, 1), torch.zeros(1, 1, 2), torch.zeros(1, 2), torch.zeros(1, 1, 2))

    class Cfg:
        _attn_implementation = "flash_attention_2"

    class Fake(torch.nn.Module):
        config = Cfg()
        lm_head = None

    with pytest.raises(NotImplementedError, match="naive"):
        _mask_for_attention(Fake(), torch.ones(1, 1, 2, 2, dtype=torch.bool), torch.float32)
