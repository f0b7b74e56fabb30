"""The training layout of a tree: tree (one row per prompt, 4D mask, positions as sampled) and
packed (one row per thought) equal naive (K*M rows, thought trained once) in per-token log-probs,
loss and gradients, on the three tiny Qwen-VL families with images; all equal the rollout's
sampling log-probs; with M = 1 the loss and gradients equal plain GRPO's on the same completions;
the tree layout runs the vision tower once per prompt."""

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
from vlm_grpo_ma.algorithms.grpo_ma import ObjectiveSettings, token_terms
from vlm_grpo_ma.models import load_policy
from vlm_grpo_ma.rollout import HFRolloutBackend, SamplingParams, TreeRollout
from vlm_grpo_ma.rollout.layout import (
    _mask_for_attention,
    build_train_batch,
    packed_attention_mask,
    resolve_layout,
    score_tokens,
    tree_attention_mask,
)

from tests.test_rollout import FAMILIES, _messages, prompt_inputs


def _terms(tree, t_adv, a_adv, mode="token-mean", max_len=None):
    """The per-token advantages and weights of ``tree`` under ``mode`` (``grpo_ma.token_terms``, as
    the trainer computes them; canonical order, the order of every layout's trained tokens)."""
    T, A = tree.thought_lengths(), tree.answer_lengths()
    w_t, w_a = aggregation_weights(mode, T, A, max_len)
    return token_terms(ObjectiveSettings(loss_agg_mode=mode), t_adv, a_adv, w_t, w_a, T, A)


@pytest.fixture(scope="module", params=FAMILIES)
def policy(request):
    return load_policy(request.param)


@pytest.fixture(scope="module")
def tree(policy):
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    sp = SamplingParams(max_thought_tokens=9, max_answer_tokens=5, seed=2)
    return backend.generate_tree(prompt_inputs(policy, _messages()), K=3, M=3, sampling=sp)


def _loss_and_grads(model, batch, terms, old_logp, **kw):
    model.zero_grad(set_to_none=True)
    logp = score_tokens(model, batch)
    loss, _ = clipped_policy_loss(logp, old_logp, terms.advantages, terms.weights, clip_low=0.1, clip_high=0.3, **kw)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), loss.detach(), grads


def _perturbed_old(batch):
    """Old log-probs a little off the current policy, so some ratios clip."""
    g = torch.Generator().manual_seed(0)
    return batch.rollout_logp + 0.2 * torch.randn(batch.rollout_logp.shape, generator=g)


@pytest.mark.parametrize("layout", ["tree", "packed"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_layout_equals_naive(policy, tree, mode, layout):
    check_layout_equals_naive(policy, tree, mode, layout)


def check_layout_equals_naive(policy, tree, mode, layout):
    """``layout`` (tree or packed) == naive: same trained tokens, log-probs, loss and gradients."""
    rewards = torch.rand(2, 3, 3, generator=torch.Generator().manual_seed(1))
    t_adv, a_adv = grpo_ma_advantages(rewards)
    pad = policy.tokenizer.pad_token_id
    naive = build_train_batch(policy.model, tree, layout="naive", pad_id=pad)
    packed = build_train_batch(policy.model, tree, layout=layout, pad_id=pad)
    rows = {"tree": 2, "packed": 2 * 3}[layout]
    assert naive.input_ids.shape[0] == 2 * 3 * 3 and packed.input_ids.shape[0] == rows
    assert packed.attention_mask.shape == (rows, 1, packed.input_ids.shape[1], packed.input_ids.shape[1])
    # same trained tokens, same order, same per-token values
    N = int(tree.thought_lengths().sum() + tree.answer_lengths().sum())
    assert naive.num_tokens == packed.num_tokens == N
    for f in ("targets", "is_thought", "rollout_logp", "thought_lens", "answer_lens"):
        assert torch.equal(getattr(naive, f), getattr(packed, f)), f
    terms = _terms(tree, t_adv, a_adv, mode)
    if layout == "tree":
        # the whole tree, each prompt once: the forward computes exactly the unique tokens
        P = sum(len(p) for p in tree.prompt_ids)
        assert int((packed.input_ids != pad).sum()) <= P + N <= packed.num_positions
        assert packed.pixel_values.shape[0] == sum(int(g.prod(-1).sum()) for g in tree.image_grid_thw)
    old = _perturbed_old(naive)
    lp_n, loss_n, g_n = _loss_and_grads(policy.model, naive, terms, old)
    lp_p, loss_p, g_p = _loss_and_grads(policy.model, packed, terms, old)
    torch.testing.assert_close(lp_p, lp_n, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_p, loss_n, atol=1e-6, rtol=1e-5)
    assert g_n.keys() == g_p.keys() and len(g_n) > 10
    for name in g_n:
        torch.testing.assert_close(g_p[name], g_n[name], atol=1e-6, rtol=1e-4, msg=name)
    # both equal the sampling log-probs of the rollout
    torch.testing.assert_close(lp_p, packed.rollout_logp, atol=1e-4, rtol=0)
    # each thought token is trained once: the weights of a token-mean loss sum to 1
    if mode == "token-mean":
        assert terms.weights.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert terms.weights[0].item() == pytest.approx(1.0 / N)


def test_tree_runs_vision_tower_once_per_prompt(policy, tree):
    """The vision tower sees each prompt's patches once in the tree layout, K times in packed."""
    seen = []
    hook = policy.model.model.visual.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    try:
        patches = sum(int(g.prod(-1).sum()) for g in tree.image_grid_thw)
        for layout, times in (("tree", 1), ("packed", 3)):
            seen.clear()
            with torch.no_grad():
                score_tokens(policy.model, build_train_batch(policy.model, tree, layout=layout))
            assert sum(seen) == times * patches, layout
    finally:
        hook.remove()


def test_all_aggregation_modes_packed_equals_naive():
    """Every aggregation mode, one family (the model forward is shared; only weights change)."""
    policy = load_policy("tiny-qwen2.5-vl")
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    tr = backend.generate_tree(prompt_inputs(policy, _messages()), K=2, M=3,
                               sampling=SamplingParams(max_thought_tokens=7, max_answer_tokens=4, seed=4))
    t_adv, a_adv = grpo_ma_advantages(torch.rand(2, 2, 3, generator=torch.Generator().manual_seed(3)))
    for mode in AGGREGATION_MODES:
        n = build_train_batch(policy.model, tr, layout="naive")
        terms = _terms(tr, t_adv, a_adv, mode)
        old = _perturbed_old(n)
        _, loss_n, g_n = _loss_and_grads(policy.model, n, terms, old)
        for layout in ("tree", "packed"):
            p = build_train_batch(policy.model, tr, layout=layout)
            _, loss_p, g_p = _loss_and_grads(policy.model, p, terms, old)
            torch.testing.assert_close(loss_p, loss_n, atol=1e-6, rtol=1e-5, msg=f"{layout} {mode}")
            for name in g_n:
                torch.testing.assert_close(g_p[name], g_n[name], atol=1e-6, rtol=1e-4, msg=f"{layout} {mode} {name}")


def test_packed_equals_naive_eager_attention():
    policy = load_policy("tiny-qwen3-vl", attn_implementation="eager")
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    tr = backend.generate_tree(prompt_inputs(policy, _messages()), K=2, M=2,
                               sampling=SamplingParams(max_thought_tokens=6, max_answer_tokens=4, seed=9))
    n = build_train_batch(policy.model, tr, layout="naive")
    for layout in ("tree", "packed"):
        p = build_train_batch(policy.model, tr, layout=layout)
        with torch.no_grad():
            torch.testing.assert_close(score_tokens(policy.model, p), score_tokens(policy.model, n), atol=1e-5, rtol=0)
            torch.testing.assert_close(score_tokens(policy.model, p), p.rollout_logp, atol=1e-4, rtol=0)


def test_m1_equals_plain_grpo(policy):
    """M = 1: the tree loss (tree and packed layouts, GRPO-MA advantages) and its gradients equal plain
    GRPO's: one right-padded completion per row scored by the model's own forward, GRPO
    advantages, ``masked_clipped_policy_loss`` (verl-style [G, T] aggregation)."""
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    tr = backend.generate_tree(prompt_inputs(policy, _messages()), K=4, M=1,
                               sampling=SamplingParams(max_thought_tokens=7, max_answer_tokens=4, seed=6))
    rewards = torch.tensor([[0.1, 0.9, 0.4, 0.4], [1.0, 0.0, 0.5, 0.2]])
    t_adv, a_adv = grpo_ma_advantages(rewards[..., None])
    adv = grpo_advantages(rewards)  # [B, G]
    torch.testing.assert_close(t_adv, adv)
    for mode, layout in (("token-mean", "tree"), ("seq-mean-token-mean", "packed"), ("seq-mean-token-sum-norm", "tree")):
        batch = build_train_batch(policy.model, tr, layout=layout)
        old = _perturbed_old(batch)
        _, loss_tree, g_tree = _loss_and_grads(policy.model, batch, _terms(tr, t_adv, a_adv, mode), old)

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
    p = build_train_batch(policy.model, tr, layout="packed", pad_id=0)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    # positions restart for each answer at the thought's end (text: the same on all 3 rows)
    assert p.position_ids[:, 0].tolist() == [[0, 1, 2, 3, 4, 5, 6, 5]] * 3
    # thought tokens predicted from positions 2,3; answer 0 from 4 (</think> slot), 5; answer 1 from 4
    assert p.logit_cols.tolist() == [2, 3, 4, 5, 4]
    assert p.targets.tolist() == [8, 9, 10, 11, 12]
    assert p.is_thought.tolist() == [True, True, False, False, False]
    assert p.rollout_logp.tolist() == [-1.0, -2.0, -3.0, -4.0, -5.0]
    terms = _terms(tr, torch.tensor([[0.5]]), torch.tensor([[[1.0, -1.0]]]))
    assert terms.advantages.tolist() == [0.5, 0.5, 1.0, 1.0, -1.0]
    assert terms.weights.tolist() == pytest.approx([0.2] * 5)
    n = build_train_batch(policy.model, tr, layout="naive", pad_id=0)
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
    with pytest.raises(ValueError, match="layout"):
        build_train_batch(policy.model, tr, layout="trie")
    with pytest.raises(ValueError, match="thought_lens"):  # per-segment values of another tree's shape
        _terms(tr, torch.zeros(2, 1), torch.zeros(1, 1, 2))

    class Cfg:
        _attn_implementation = "flash_attention_2"

    class Fake(torch.nn.Module):
        config = Cfg()
        lm_head = None

    with pytest.raises(NotImplementedError, match="naive"):
        _mask_for_attention(Fake(), torch.ones(1, 1, 2, 2, dtype=torch.bool), torch.float32)
    # a kernel that cannot take the 4D mask falls back to naive, with a warning (once), never a crash
    from vlm_grpo_ma.rollout import layout as layout_mod

    layout_mod._warned.discard("flash_attention_2")
    with pytest.warns(UserWarning, match="naive layout instead"):
        assert resolve_layout(Fake(), "tree") == "naive"
    assert resolve_layout(Fake(), "packed") == "naive" and resolve_layout(Fake(), "naive") == "naive"
    assert resolve_layout(policy.model, "tree") == "tree" and resolve_layout(policy.model, "packed") == "packed"


def _text_tree2() -> TreeRollout:
    """B=1 prompt of 3 tokens, K=2 thoughts (2 and 1 tokens), M=2 answers each (2,1 and 1,2)."""
    t = lambda *x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    f = lambda *x: torch.tensor(x, dtype=torch.float)  # noqa: E731
    return TreeRollout(
        prompt_ids=[t(5, 6, 7)], prompt_mm_token_type_ids=[t(0, 0, 0)], pixel_values=[None], image_grid_thw=[None],
        thought_ids=[[t(8, 9), t(20)]], thought_logprobs=[[f(-1.0, -2.0), f(-6.0)]],
        thought_truncated=torch.tensor([[False, False]]),
        answer_ids=[[[t(10, 11), t(12)], [t(21), t(22, 23)]]],
        answer_logprobs=[[[f(-3.0, -4.0), f(-5.0)], [f(-7.0), f(-8.0, -9.0)]]],
        answer_truncated=torch.tensor([[[False, False], [False, False]]]),
    )


def test_tree_positions_targets_and_mask_by_hand():
    policy = load_policy("tiny-qwen2-vl")
    tr = _text_tree2()
    t_adv, a_adv = torch.tensor([[0.5, -0.5]]), torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])
    p = build_train_batch(policy.model, tr, layout="tree", pad_id=0)
    #                            prompt    th0   a00     a01 th1 a10 a11
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 20, 21, 22, 23]]
    # thoughts continue from the prompt's end, answers from their own thought's end
    assert p.position_ids[:, 0].tolist() == [[0, 1, 2, 3, 4, 5, 6, 5, 3, 4, 4, 5]] * 3
    # both thoughts' first tokens are predicted from the prompt's last position (2), the answers'
    # first tokens from their thought's last position (4 for thought 0, 8 for thought 1)
    assert p.logit_cols.tolist() == [2, 3, 4, 5, 4, 2, 8, 8, 10]
    assert p.targets.tolist() == [8, 9, 10, 11, 12, 20, 21, 22, 23]
    assert p.is_thought.tolist() == [True, True, False, False, False, True, False, False, False]
    assert p.rollout_logp.tolist() == [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0]
    assert _terms(tr, t_adv, a_adv).advantages.tolist() == [0.5, 0.5, 1.0, 1.0, -1.0, -0.5, 2.0, -2.0, -2.0]
    m = p.attention_mask[0, 0].int().tolist()
    assert m == [
        # 5  6  7  8  9 10 11 12 20 21 22 23
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # thought 0
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # answer 00: prompt, thought 0, itself
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0],  # answer 01: not answer 00
        [1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0],  # thought 1: the prompt and itself only
        [1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0],  # answer 10: prompt, thought 1, itself
        [1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0],  # answer 11
        [1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1, 1],
    ]
    n = build_train_batch(policy.model, tr, layout="naive", pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(score_tokens(policy.model, p), score_tokens(policy.model, n), atol=1e-5, rtol=0)


def test_tree_attention_mask_padding():
    branch = torch.tensor([[-1, 0, 0, 1, -2]])
    answer = torch.tensor([[-1, -1, 0, -1, -1]])
    assert tree_attention_mask(branch, answer)[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 0, 0, 1, 0],  # thought 1 never sees thought 0 or its answers
        [0, 0, 0, 0, 1],  # padding sees only itself
    ]
