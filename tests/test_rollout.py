"""Tree rollouts with the transformers backend on the three tiny Qwen-VL families, with images.

What is checked: greedy continuation from the shared (cached) prefix equals transformers'
``generate`` from scratch on prompt + thought; the sampling log-probs equal a fresh scoring
forward that lets the model compute its own mRoPE positions; the truncation flag; the tree's
shapes and index; M = 1 gives K plain (thought, answer) completions; vision tokens are never
sampled; the model's ``rope_deltas`` state is neither read nor left behind.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlm_grpo_ma.data.collate import build_generation_inputs
from vlm_grpo_ma.models import load_policy
from vlm_grpo_ma.rollout import HFRolloutBackend, SamplingParams, TreeRollout

FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"]


def _messages():
    """Two prompts of different lengths with images of different sizes (so left padding and
    different image grids are exercised)."""
    return [
        [{"role": "user", "content": [
            {"type": "image", "image": Image.new("RGB", (64, 48), (200, 30, 30))},
            {"type": "text", "text": "Where is the red box? Think, then answer."}]}],
        [{"role": "user", "content": [
            {"type": "image", "image": Image.new("RGB", (96, 64), (0, 0, 255))},
            {"type": "text", "text": "Point at it."}]}],
    ]


def prompt_inputs(policy, messages):
    """Left-padded generation inputs (what the trainer passes to ``generate_tree``)."""
    return dict(build_generation_inputs(policy.processor, messages))


@pytest.fixture(scope="module", params=FAMILIES)
def policy(request):
    torch.manual_seed(0)
    return load_policy(request.param)


@pytest.fixture(scope="module")
def inputs(policy):
    return prompt_inputs(policy, _messages())


@pytest.fixture(scope="module")
def one_policy():
    """One family, for checks that do not depend on the family's positions."""
    return load_policy("tiny-qwen2.5-vl")


@pytest.fixture(scope="module")
def one_inputs(one_policy):
    return prompt_inputs(one_policy, _messages())


def fresh_path_logprobs(model, tree: TreeRollout, b: int, k: int, m: int, temperature: float = 1.0):
    """log p of thought + answer tokens from one forward over prompt + thought + answer, the
    model computing its own mRoPE positions (mm_token_type_ids extended with zeros)."""
    th, an = tree.thought_ids[b][k], tree.answer_ids[b][k][m]
    seq = torch.cat([tree.prompt_ids[b], th, an])[None]
    mm = torch.cat([tree.prompt_mm_token_type_ids[b], torch.zeros(len(th) + len(an), dtype=torch.long)])[None]
    with torch.no_grad():
        logits = model(input_ids=seq, mm_token_type_ids=mm, pixel_values=tree.pixel_values[b],
                       image_grid_thw=tree.image_grid_thw[b]).logits[0].float()
    lp = torch.log_softmax(logits[:-1] / temperature, -1).gather(-1, seq[0, 1:, None])[:, 0]
    return lp[len(tree.prompt_ids[b]) - 1:]


def test_greedy_continuation_equals_generation_from_scratch(policy, inputs):
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    greedy = SamplingParams(temperature=0.0, max_thought_tokens=8, max_answer_tokens=6)
    tree = backend.generate_tree(inputs, K=2, M=2, sampling=greedy)
    ids = backend.ids
    for b in range(2):
        # greedy: the K thoughts and the M answers are all equal
        assert torch.equal(tree.thought_ids[b][0], tree.thought_ids[b][1])
        assert torch.equal(tree.answer_ids[b][0][0], tree.answer_ids[b][1][1])
        th = tree.thought_ids[b][0]
        seq = torch.cat([tree.prompt_ids[b], th])[None]
        mm = torch.cat([tree.prompt_mm_token_type_ids[b], torch.zeros(len(th), dtype=torch.long)])[None]
        fresh = dict(input_ids=seq, attention_mask=torch.ones_like(seq), mm_token_type_ids=mm,
                     pixel_values=tree.pixel_values[b], image_grid_thw=tree.image_grid_thw[b])
        ref = policy.model.generate(**fresh, max_new_tokens=6, do_sample=False, suppress_tokens=list(ids.suppress),
                                    eos_token_id=list(ids.stop), pad_token_id=ids.pad)[0, seq.shape[1]:]
        ans = tree.answer_ids[b][0][0]
        assert ans.tolist() == ref[: len(ans)].tolist()
        assert len(ans) == 6 or ans[-1].item() in ids.stop
        # and our own single-stage generation from scratch agrees
        tok, _, n = backend.generate_ids(fresh, n=1, max_new_tokens=6)
        assert tok[0, : n[0]].tolist() == ans.tolist()


def test_sampling_logprobs_equal_fresh_forward(policy, inputs):
    """Temperature 0.7 (log-probs of softmax(logits / T)); temperature 1 is checked in the M = 1 test."""
    temperature = 0.7
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    sp = SamplingParams(temperature=temperature, max_thought_tokens=10, max_answer_tokens=6, seed=3)
    tree = backend.generate_tree(inputs, K=2, M=2, sampling=sp)
    for b in range(2):
        for k in range(2):
            for m in range(2):
                got = torch.cat([tree.thought_logprobs[b][k], tree.answer_logprobs[b][k][m]])
                ref = fresh_path_logprobs(policy.model, tree, b, k, m, temperature)
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_seed_reproducible_and_stale_rope_deltas_ignored(policy, inputs):
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    sp = SamplingParams(max_thought_tokens=6, max_answer_tokens=4, seed=11)
    a = backend.generate_tree(inputs, K=2, M=2, sampling=sp)
    assert policy.model.model.rope_deltas is None  # no state left for a later forward to misuse
    policy.model.model.rope_deltas = torch.full((2, 1), 1000)  # stale state from "another" forward
    b = backend.generate_tree(inputs, K=2, M=2, sampling=sp)
    assert a.thought_ids[1][1].tolist() == b.thought_ids[1][1].tolist()
    assert a.answer_ids[0][1][0].tolist() == b.answer_ids[0][1][0].tolist()
    torch.testing.assert_close(a.answer_logprobs[1][0][1], b.answer_logprobs[1][0][1])


def _bias_hook(policy, B: int, token: int, per_prompt: list[float]):
    """Add ``per_prompt[b]`` to the logit of ``token`` in every row of prompt b (rows are
    prompt-major in every stage, so row r belongs to prompt r // (rows / B))."""
    bias = torch.tensor(per_prompt)

    def hook(module, args, out):
        out = out.clone()
        out[..., token] += bias.repeat_interleave(out.shape[0] // B).view(-1, *[1] * (out.dim() - 2))
        return out

    return policy.model.lm_head.register_forward_hook(hook)


def test_thought_truncation_flag(policy, inputs):
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    think_end = backend.ids.think_end
    # prompt 0 closes its thoughts at once; prompt 1 can never sample </think>
    handle = _bias_hook(policy, 2, think_end, [100.0, -100.0])
    try:
        tree = backend.generate_tree(inputs, K=3, M=1, sampling=SamplingParams(max_thought_tokens=5, max_answer_tokens=3, seed=0))
    finally:
        handle.remove()
    assert tree.thought_truncated.tolist() == [[False] * 3, [True] * 3]
    for k in range(3):
        assert tree.thought_ids[0][k].tolist() == [think_end]
        assert tree.thought_ids[1][k][-1].item() == think_end and len(tree.thought_ids[1][k]) == 5
        assert think_end not in tree.thought_ids[1][k][:-1].tolist()
        # the forced token carries the policy's (here very low) log-prob
        assert tree.thought_logprobs[1][k][-1].item() < -50
        assert tree.thought_texts[1][k].endswith("</think>")


def test_multi_token_think_end(one_policy, one_inputs):
    """Qwen2/2.5-VL checkpoints spell ``</think>`` with several ordinary tokens: a thought then
    ends when its text contains the tag, and a truncated one is closed with the whole sequence.
    Here ``</thinq>`` (5 BPE tokens of the tiny tokenizer) plays that role."""
    import dataclasses

    backend = HFRolloutBackend(one_policy.model, one_policy.tokenizer)
    close = tuple(one_policy.tokenizer.encode("</thinq>", add_special_tokens=False))
    assert len(close) == 5
    backend.ids = dataclasses.replace(backend.ids, think_end=None, think_end_ids=close, think_end_text="</thinq>")
    calls = {"n": 0}

    def hook(module, args, out):  # prompt 0 writes the tag at once (greedy), prompt 1 never does
        out = out.clone()
        i = calls["n"]
        calls["n"] += 1
        if i < len(close):
            rows = out.shape[0] // 2
            out[:rows, ..., close[i]] += 100.0
        return out

    handle = one_policy.model.lm_head.register_forward_hook(hook)
    try:
        tree = backend.generate_tree(one_inputs, K=2, M=1, sampling=SamplingParams(temperature=0.0, max_thought_tokens=12, max_answer_tokens=3))
    finally:
        handle.remove()
    assert tree.thought_truncated.tolist() == [[False, False], [True, True]]
    for k in range(2):
        assert tree.thought_ids[0][k].tolist() == list(close)
        assert tree.thought_ids[1][k][-5:].tolist() == list(close) and len(tree.thought_ids[1][k]) == 12
        assert tree.thought_texts[1][k].endswith("</thinq>")
    # the forced tokens are fed like sampled ones: the answers continue the right prefix
    got = torch.cat([tree.thought_logprobs[1][0], tree.answer_logprobs[1][0][0]])
    torch.testing.assert_close(got, fresh_path_logprobs(one_policy.model, tree, 1, 0, 0), atol=1e-4, rtol=0)


def test_vision_tokens_never_sampled(one_policy, one_inputs):
    backend = HFRolloutBackend(one_policy.model, one_policy.tokenizer)
    image_pad = one_policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    handle = _bias_hook(one_policy, 2, image_pad, [50.0, 50.0])
    try:
        tree = backend.generate_tree(one_inputs, K=2, M=2, sampling=SamplingParams(max_thought_tokens=6, max_answer_tokens=4, seed=0))
    finally:
        handle.remove()
    generated = torch.cat([t for row in tree.thought_ids for t in row] +
                          [a for row in tree.answer_ids for th in row for a in th])
    assert not torch.isin(generated, torch.tensor(backend.ids.suppress)).any()


def test_tree_shapes_and_index(one_policy, one_inputs):
    backend = HFRolloutBackend(one_policy.model, one_policy.tokenizer)
    B, K, M = 2, 3, 2
    sp = SamplingParams(max_thought_tokens=6, max_answer_tokens=4, seed=5)
    tree = backend.generate_tree(one_inputs, K=K, M=M, sampling=sp)
    assert (tree.B, tree.K, tree.M) == (B, K, M)
    assert tree.thought_truncated.shape == (B, K) and tree.answer_truncated.shape == (B, K, M)
    assert [len(r) for r in tree.thought_ids] == [K, K]
    assert all(len(th) == M for row in tree.answer_ids for th in row)
    assert tree.index()[:5].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [0, 2, 0]]
    assert tree.index()[-1].tolist() == [1, 2, 1] and tree.index().shape == (B * K * M, 3)
    assert len(tree.flat_pairs()) == B * K * M
    assert tree.flat_pairs()[3] == (tree.thought_texts[0][1], tree.answer_texts[0][1][1])
    for b in range(B):
        assert tree.prompt_ids[b].tolist() == one_inputs["input_ids"][b][one_inputs["attention_mask"][b].bool()].tolist()
        assert tree.pixel_values[b].shape[0] == int(tree.image_grid_thw[b].prod(-1).sum())
        for k in range(K):
            t = tree.thought_ids[b][k]
            assert 1 <= len(t) <= 6 and t[-1].item() == backend.ids.think_end
            assert tree.thought_logprobs[b][k].shape == t.shape
            assert (tree.thought_logprobs[b][k] <= 0).all()
            for m in range(M):
                a = tree.answer_ids[b][k][m]
                assert 1 <= len(a) <= 4 and tree.answer_logprobs[b][k][m].shape == a.shape
                assert bool(tree.answer_truncated[b, k, m]) == (a[-1].item() not in backend.ids.stop)
    # pixel chunks partition the processor's flat pixel_values, in prompt order
    torch.testing.assert_close(torch.cat(tree.pixel_values), one_inputs["pixel_values"])
    assert tree.stats["tokens_prefilled"] == float(one_inputs["attention_mask"].sum())
    assert tree.stats["tokens_generated"] == float(tree.thought_lengths().sum() * 1 + tree.answer_lengths().sum())


def test_m1_is_plain_sampling(policy, inputs):
    """With M = 1 the tree is K independent completions per prompt, each (thought, answer)
    a sample of the policy, exactly scored; K = M = 1 with the same seed twice is the same."""
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    sp = SamplingParams(max_thought_tokens=8, max_answer_tokens=5, seed=7)
    tree = backend.generate_tree(inputs, K=4, M=1, sampling=sp)
    assert tree.index()[:, 2].eq(0).all() and tree.index().shape == (8, 3)
    assert tree.answer_lengths().shape == (2, 4, 1)
    for b in range(2):
        for k in range(4):
            got = torch.cat([tree.thought_logprobs[b][k], tree.answer_logprobs[b][k][0]])
            torch.testing.assert_close(got, fresh_path_logprobs(policy.model, tree, b, k, 0), atol=1e-4, rtol=0)


def test_plain_generate_greedy(one_policy):
    """``generate(messages_batch, n)``: greedy by default, n equal completions per prompt, equal
    to transformers' greedy ``generate`` on the same inputs, end token dropped."""
    backend = HFRolloutBackend(one_policy.model, processor=one_policy.processor)
    texts = backend.generate(_messages(), n=2, max_new_tokens=7)
    assert len(texts) == 2 and all(len(t) == 2 and t[0] == t[1] for t in texts)
    inputs = prompt_inputs(one_policy, _messages())
    ids = backend.ids
    ref = one_policy.model.generate(**inputs, max_new_tokens=7, do_sample=False, suppress_tokens=list(ids.suppress),
                                eos_token_id=list(ids.stop), pad_token_id=ids.pad)[:, inputs["input_ids"].shape[1]:]
    for b in range(2):
        toks = [t for t in ref[b].tolist()]
        if any(t in ids.stop for t in toks):
            toks = toks[: next(i for i, t in enumerate(toks) if t in ids.stop)]
        assert texts[b][0] == one_policy.tokenizer.decode(toks, skip_special_tokens=False)


def test_sample_next_filters():
    from vlm_grpo_ma.rollout import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # top_k=2 / top_p=0.6: only tokens 0 and 1 can be drawn; suppressing 0 (before top-k) and
    # keeping the top 1 leaves 1
    g = torch.Generator().manual_seed(0)
    for sp in (SamplingParams(top_k=2), SamplingParams(top_p=0.6)):
        draws = {sample_next(logits, sp, generator=g)[0].item() for _ in range(200)}
        assert draws == {0, 1}
    for _ in range(20):
        tok, lp, _ = sample_next(logits, SamplingParams(top_k=1, temperature=1.0), torch.tensor([0]), g)
        assert tok.item() == 1
    assert {sample_next(logits, SamplingParams(top_k=2), torch.tensor([0]), g)[0].item() for _ in range(200)} == {1, 2}
    assert tok.item() == 1 and lp.item() == pytest.approx(float(torch.log(torch.tensor(0.3))), abs=1e-6)
    tok, lp, _ = sample_next(logits, SamplingParams(temperature=0.0))
    assert tok.item() == 0 and lp.item() == pytest.approx(float(torch.log(torch.tensor(0.5))), abs=1e-6)
    # temperature 2: log-prob under softmax(logits / 2)
    tok, lp, _ = sample_next(logits, SamplingParams(temperature=2.0), generator=g)
    ref = torch.log_softmax(logits / 2, -1)[0, tok.item()]
    assert lp.item() == pytest.approx(ref.item(), abs=1e-6)


def _synced_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        policy = load_policy("tiny-qwen2-vl")
        inputs = prompt_inputs(policy, _messages())
        plain = HFRolloutBackend(policy.model, policy.tokenizer)
        synced = HFRolloutBackend(policy.model, policy.tokenizer, synced_gpus=True)
        ids = plain.ids
        # rank 0 stops every thought and answer at once, rank 1 runs to the limits (stage 2 is
        # the only stage with B*K*M = 8 rows: there the end token is pushed, elsewhere </think>)
        big = 100.0 if rank == 0 else -100.0

        def hook(module, args, out):
            out = out.clone()
            out[..., ids.stop[0] if out.shape[0] == 8 else ids.think_end] += big
            return out

        handle = policy.model.lm_head.register_forward_hook(hook)
        sp = SamplingParams(max_thought_tokens=6, max_answer_tokens=4, seed=rank)
        try:
            a = synced.generate_tree(inputs, K=2, M=2, sampling=sp)
            b = plain.generate_tree(inputs, K=2, M=2, sampling=sp)
        finally:
            handle.remove()
        same = all(a.thought_ids[i][k].tolist() == b.thought_ids[i][k].tolist()
                   and a.answer_ids[i][k][m].tolist() == b.answer_ids[i][k][m].tolist()
                   for i in range(2) for k in range(2) for m in range(2))
        torch.save({"same": same, "thought_lens": a.thought_lengths().tolist(),
                    "answer_lens": a.answer_lengths().tolist()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_synced_gpus_ranks_stopping_at_different_lengths(tmp_path):
    """Two gloo ranks, one finishing at once and one running to the limits: with
    ``synced_gpus`` both keep stepping together (no deadlock) and sample what they would alone."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_synced_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["same"] and r1["same"]
    assert r0["thought_lens"] == [[1, 1], [1, 1]] and r1["thought_lens"] == [[6, 6], [6, 6]]
    # rank 0's answers: </think> (the first answer token comes from the 4-row stage-1 logits), then the end token
    assert r0["answer_lens"] == [[[2, 2]] * 2] * 2 and r1["answer_lens"] == [[[4, 4]] * 2] * 2


def test_sample_categorical_matches_the_distribution_and_never_draws_zero_weight():
    from vlm_grpo_ma.rollout import sample_categorical

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [0.0, 0.0, 2.0, 0.0, 2.0]])  # row 2 unnormalised
    g = torch.Generator().manual_seed(0)
    n = 40_000
    draws = sample_categorical(probs.repeat(n, 1), g).view(n, 2)
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=5).float() / n
        want = probs[row] / probs[row].sum()
        sigma = (want * (1 - want) / n).sqrt()
        assert torch.all((freq - want).abs() <= 5 * sigma + 1e-12), (row, freq, want)
    assert set(draws[:, 1].tolist()) == {2, 4}


@pytest.mark.parametrize("u, expected", [(0.0, [1, 2]), (1.0, [2, 2]), (0.5, [2, 2]), (0.49, [1, 2])])
def test_sample_categorical_edges_of_the_uniform_draw(monkeypatch, u, expected):
    """u = 0 must not pick a leading zero-weight index; u rounding up to the total must not pick a
    trailing zero-weight one (the second row's weight sits in index 2 only)."""
    from vlm_grpo_ma.rollout import sample_categorical

    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda n, m, **kw: torch.full((n, m), u, dtype=kw.get("dtype", torch.float32)))
    assert sample_categorical(probs).tolist() == expected
