"""Dynamic sampling's rounds (``training/dynamic_sampling.collect``) on fake generators: which
prompts are kept, dropped and refilled, in which order their pairs are scored, the cap on rounds,
the fallback; and the HF backend's ``generate_answers`` (the pilot's second half) on the tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vlm_grpo_ma.rollout.types import TreeRollout, append_answers, cat_prompts
from vlm_grpo_ma.training.dynamic_sampling import collect, has_spread

K, M = 2, 3


def _tree(samples, m, offset=0):
    """A fake tree: answer text 'name:k:m' (m counted from ``offset``), one token per segment."""
    B = len(samples)
    one = torch.tensor([1])
    return TreeRollout(
        prompt_ids=[one] * B, prompt_mm_token_type_ids=[torch.zeros(1, dtype=torch.long)] * B,
        pixel_values=[None] * B, image_grid_thw=[None] * B,
        thought_ids=[[one] * K for _ in range(B)], thought_logprobs=[[torch.zeros(1)] * K for _ in range(B)],
        thought_truncated=torch.zeros(B, K, dtype=torch.bool),
        answer_ids=[[[one] * m for _ in range(K)] for _ in range(B)],
        answer_logprobs=[[[torch.zeros(1)] * m for _ in range(K)] for _ in range(B)],
        answer_truncated=torch.zeros(B, K, m, dtype=torch.bool),
        thought_texts=[[f"{s['name']}:{k}" for k in range(K)] for s in samples],
        answer_texts=[[[f"{s['name']}:{k}:{offset + j}" for j in range(m)] for k in range(K)] for s in samples],
        stats={"tokens_decoded": float(B * K * (m + (0 if offset else 1)))},
    )


class Fake:
    """Generation and scoring from per-sample reward tables [K][M]; counts the work."""

    def __init__(self):
        self.generated = []  # (names, m) per generate call
        self.extended = []

    def generate(self, samples, m):
        self.generated.append(([s["name"] for s in samples], m))
        return _tree(samples, m)

    def extend(self, tree, m):
        names = [t[0].split(":")[0] for t in tree.thought_texts]
        self.extended.append((names, m))
        samples = [{"name": n} for n in names]
        return _tree(samples, m, offset=tree.M)

    @staticmethod
    def score(tree, samples):
        out = []
        for b, s in enumerate(samples):
            for k in range(tree.K):
                for j in range(tree.M):
                    name, kk, mm = tree.answer_texts[b][k][j].split(":")
                    assert name == s["name"]
                    out.append(SimpleNamespace(total=s["r"][int(kk)][int(mm)], name=tree.answer_texts[b][k][j]))
        return out


def S(name, table):
    return {"name": name, "r": table}


FLAT0 = [[0, 0, 0], [0, 0, 0]]
SPREAD = [[1, 0, 1], [0, 0, 1]]
LATE = [[0, 1, 0], [0, 0, 0]]  # pilot answers (m = 0) equal, spread among the others: a pilot false drop


def test_has_spread():
    assert has_spread(torch.tensor([[[1.0, 1.0]], [[0.0, 1.0]]])).tolist() == [False, True]


def test_full_drops_refills_and_trims():
    fake = Fake()
    rounds = {1: [S("d", SPREAD), S("e", SPREAD)]}
    got = collect("full", [S("a", FLAT0), S("b", SPREAD), S("c", LATE)], K=K, M=M, target=3, max_rounds=2,
                  generate=fake.generate, extend=fake.extend, score=fake.score, more=rounds.__getitem__)
    assert [s["name"] for s in got.samples] == ["b", "c", "d"]  # LATE has spread in its full tree
    assert got.rollout.B == 3 and got.rollout.M == M
    assert [x.name for x in got.scored[:6]] == [f"b:{k}:{m}" for k in range(K) for m in range(M)]
    assert got.stats["dynamic/rounds"] == 2 and got.stats["dynamic/prompts_sampled"] == 5
    assert got.stats["dynamic/prompts_kept"] == 4 and got.stats["dynamic/prompts_trained"] == 3
    assert got.stats["dynamic/fallback"] == 0
    assert fake.extended == []
    r = torch.tensor([x.total for x in got.scored]).reshape(3, K, M)
    assert has_spread(r).all()  # no zero-spread group trained
    assert got.rollout.stats["tokens_decoded"] == 5 * K * (M + 1)  # the work of every round counted


def one_pass(fake):
    """A fake ``generate_pilot``: the pilot tree, ``decide``, then the kept prompts' other answers."""
    def run(samples, decide):
        pilot = fake.generate(samples, 1)
        kept = list(decide(pilot))
        if not kept:
            return pilot, None
        sub = _tree([samples[i] for i in kept], 1)
        return pilot, fake.extend(sub, M - 1)
    return run


@pytest.mark.parametrize("single_pass", [False, True])
def test_pilot_drops_before_the_other_answers_and_completes_the_kept(single_pass):
    fake = Fake()
    got = collect("pilot", [S("a", FLAT0), S("b", SPREAD), S("c", LATE)], K=K, M=M, target=3, max_rounds=0,
                  generate=fake.generate, extend=fake.extend, score=fake.score, more=lambda r: [],
                  generate_pilot=one_pass(fake) if single_pass else None)
    assert fake.generated == [(["a", "b", "c"], 1)]  # thoughts + one answer each
    assert fake.extended == [(["b"], M - 1)]  # only the kept prompt gets its other answers
    assert [s["name"] for s in got.samples] == ["b"] and got.rollout.M == M
    # flat order (k, m): the pilot answer first, then the new ones
    assert [x.name for x in got.scored] == [f"b:{k}:{m}" for k in range(K) for m in range(M)]
    assert [x.total for x in got.scored] == [v for row in SPREAD for v in row]
    assert got.stats["dynamic/pilot_dropped"] == 2  # a (no spread) and c (a false drop)
    assert got.rollout.answer_texts[0][1] == ["b:1:0", "b:1:1", "b:1:2"]


def test_rounds_are_capped_and_no_spread_falls_back_to_round_0():
    fake = Fake()
    got = collect("full", [S("a", FLAT0)], K=K, M=M, target=1, max_rounds=2, generate=fake.generate,
                  extend=fake.extend, score=fake.score, more=lambda r: [S(f"x{r}", FLAT0)])
    assert len(fake.generated) == 3  # round 0 and the 2 extra rounds, no more
    assert got.stats["dynamic/fallback"] == 1 and [s["name"] for s in got.samples] == ["a"]
    fake = Fake()
    got = collect("pilot", [S("a", FLAT0)], K=K, M=M, target=1, max_rounds=0, generate=fake.generate,
                  extend=fake.extend, score=fake.score, more=lambda r: [])
    assert got.rollout.M == M and len(got.scored) == K * M and got.stats["dynamic/fallback"] == 1


def test_ranks_agree_on_rounds_and_batch_size():
    """The collectives decide: a rank already full keeps generating while another is short, and
    every rank trains the smallest count."""
    fake = Fake()
    r_calls: list = []
    got = collect("full", [S("a", SPREAD), S("b", SPREAD)], K=K, M=M, target=2, max_rounds=3,
                  generate=fake.generate, extend=fake.extend, score=fake.score,
                  more=lambda r: [S(f"x{r}", SPREAD)], any_rank=lambda short: r_calls.append(short) or len(r_calls) < 2,
                  min_rank=lambda n: 1)
    assert len(fake.generated) == 2  # another rank was short after round 0
    assert got.rollout.B == 1 and len(got.scored) == K * M


def test_append_answers_and_cat_prompts():
    a = _tree([S("a", FLAT0), S("b", FLAT0)], 1)
    more = _tree([S("a", FLAT0), S("b", FLAT0)], 2, offset=1)
    t = append_answers(a, more)
    assert t.M == 3 and t.answer_texts[1][0] == ["b:0:0", "b:0:1", "b:0:2"]
    assert t.answer_truncated.shape == (2, K, 3)
    c = cat_prompts([a, _tree([S("c", FLAT0)], 1)])
    assert c.B == 3 and c.thought_texts[2][0] == "c:0"
    with pytest.raises(ValueError):
        cat_prompts([a, t])


@pytest.fixture(scope="module", params=["tiny-qwen2.5-vl", "tiny-qwen2-vl", "tiny-qwen3-vl"])
def tiny(request):
    from vlm_grpo_ma import get_task
    from vlm_grpo_ma.models import load_policy
    from vlm_grpo_ma.rollout import HFRolloutBackend

    torch.manual_seed(0)
    policy = load_policy(request.param)
    task = get_task("affordance")
    msgs = [task.messages(s, policy.family) for s in task.synthetic(2, seed=4)]
    return policy, HFRolloutBackend(policy.model, processor=policy.processor), msgs


def test_generate_answers_continues_the_given_thoughts(tiny):
    from vlm_grpo_ma.rollout import SamplingParams
    from vlm_grpo_ma.rollout.layout import build_train_batch, score_tokens

    policy, backend, msgs = tiny
    greedy = SamplingParams(temperature=0.0, max_thought_tokens=8, max_answer_tokens=6)
    tree = backend.generate_tree_from_messages(msgs, 2, 1, greedy)
    again = backend.generate_answers(tree, 1, greedy)
    # greedy: prefilling prompt + thought again gives the answer the tree continued with
    for b in range(2):
        for k in range(2):
            assert torch.equal(again.answer_ids[b][k][0], tree.answer_ids[b][k][0])
            assert torch.allclose(again.answer_logprobs[b][k][0], tree.answer_logprobs[b][k][0], atol=1e-4)
            assert again.answer_texts[b][k][0] == tree.answer_texts[b][k][0]
    # sampled: the new answers' log-probs are those the training forward gives them
    sampling = SamplingParams(temperature=1.0, max_thought_tokens=8, max_answer_tokens=6, seed=3)
    pilot = backend.generate_tree_from_messages(msgs, 2, 1, sampling)
    full = append_answers(pilot, backend.generate_answers(pilot, 2, sampling))
    assert full.M == 3 and full.stats["tokens_generated"] > pilot.stats["tokens_generated"]
    batch = build_train_batch(policy.model, full)
    with torch.no_grad():
        logp = score_tokens(policy.model, batch, 1.0)
    assert torch.allclose(logp, batch.rollout_logp, atol=1e-4)


def test_refill_rounds_draw_what_the_shortfall_needs():
    fake = Fake()
    batch = [S(f"p{i}", SPREAD) for i in range(7)] + [S("flat", FLAT0)]
    got = collect("full", batch, K=K, M=M, target=8, max_rounds=2, generate=fake.generate, extend=fake.extend,
                  score=fake.score, more=lambda r: [S(f"x{r}_{i}", SPREAD) for i in range(8)])
    # 7 of 8 kept (rate 7/8): one missing prompt -> ceil(1 / 0.875) + 1 = 3 drawn, not a whole batch
    assert fake.generated[1] == (["x1_0", "x1_1", "x1_2"], M)
    assert got.rollout.B == 8 and got.stats["dynamic/prompts_sampled"] == 11
    fake = Fake()  # nothing kept yet: a whole batch
    collect("full", [S("a", FLAT0), S("b", FLAT0)], K=K, M=M, target=2, max_rounds=1, generate=fake.generate,
            extend=fake.extend, score=fake.score, more=lambda r: [S(f"x{i}", FLAT0) for i in range(5)])
    assert fake.generated[1][0] == ["x0", "x1"]


def test_generate_tree_pilot_continues_the_thoughts_cache(tiny):
    from vlm_grpo_ma.data.collate import build_generation_inputs
    from vlm_grpo_ma.rollout import SamplingParams
    from vlm_grpo_ma.rollout.layout import build_train_batch, score_tokens

    policy, backend, msgs = tiny
    inputs = build_generation_inputs(policy.processor, msgs)
    greedy = SamplingParams(temperature=0.0, max_thought_tokens=8, max_answer_tokens=6)
    seen = []
    pilot, rest = backend.generate_tree_pilot(inputs, 2, 3, greedy, lambda t: seen.append(t.M) or [1])
    tree = backend.generate_tree(inputs, 2, 1, greedy)
    assert seen == [1] and pilot.M == 1 and rest.B == 1 and rest.M == 2
    for k in range(2):  # greedy: the pilot is the plain tree, and the kept prompt's answers repeat it
        assert torch.equal(pilot.answer_ids[1][k][0], tree.answer_ids[1][k][0])
        assert all(torch.equal(a, tree.answer_ids[1][k][0]) for a in rest.answer_ids[0][k])
    assert backend.generate_tree_pilot(inputs, 2, 3, greedy, lambda t: [])[1] is None
    # sampled: the kept prompts' new answers have the log-probs the training forward gives them
    sampling = SamplingParams(temperature=1.0, max_thought_tokens=8, max_answer_tokens=6, seed=3)
    pilot, rest = backend.generate_tree_pilot(inputs, 2, 3, sampling, lambda t: [0, 1])
    full = append_answers(pilot, rest)
    batch = build_train_batch(policy.model, full)
    with torch.no_grad():
        logp = score_tokens(policy.model, batch, 1.0)
    assert torch.allclose(logp, batch.rollout_logp, atol=1e-4)
