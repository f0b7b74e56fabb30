"""A small Qwen2-style tokenizer built offline, for the tiny random models.

Byte-level BPE trained with the ``tokenizers`` library on a small built-in corpus (task prompts,
JSON answers with coordinates, reasoning text, math and code snippets), with Qwen2's
pre-tokenizer regex (digits are single tokens, as in Qwen), wrapped as transformers'
``Qwen2Tokenizer`` and given the Qwen special tokens (chat, vision, box/quad) plus the
``<think>``, ``</think>``, ``<answer>``, ``</answer>`` tags as plain added tokens (they are
never split and still decode with ``skip_special_tokens=True``, as ``<think>`` does in Qwen3).

Everything is deterministic: the corpus is generated from a fixed seed and BPE training is
deterministic, so two builds give identical files.
"""

from __future__ import annotations

import json
import random

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

#: Qwen2's pre-tokenizer (transformers' ``Qwen2Tokenizer``): digits one by one, words with one
#: leading non-letter, punctuation runs, newlines, spaces.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Qwen2-VL's special tokens, in Qwen's order (ids follow the BPE vocabulary).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
#: The reasoning / answer tags of the task format (plain added tokens, not special).
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
#: Tokens a policy must never sample: they break the next forward pass (a sampled
#: ``<|image_pad|>`` makes the Qwen-VL forward look for image features that do not exist).
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

DEFAULT_BPE_VOCAB = 1024

_OBJECTS = [
    "red box", "blue box", "green box", "yellow box", "mug", "cup", "bottle", "knife", "spoon", "bowl",
    "drawer handle", "door handle", "microwave", "faucet", "apple", "banana", "robot gripper", "table",
    "chair", "laptop", "keyboard", "book", "plate", "towel", "sponge", "scissors", "remote control",
]
_PROMPTS = [
    "Locate the {o} in the image and output its bounding box as JSON.",
    "Detect every {o} in the image. Answer with a JSON list of boxes [x1, y1, x2, y2].",
    "Point to the part of the {o} that a robot should grasp. Answer with a point (x, y).",
    "Where should the gripper touch to open the {o}? Give the affordance point.",
    "Plan a trajectory for the robot arm to move the {o} to the right of the table. "
    "Answer with a list of points.",
    "Answer the question about the image: what colour is the {o}?",
    "How many {o}s are there in the image? Answer with a number.",
    "First think step by step inside <think> </think>, then give the final answer inside <answer> </answer>.",
]
_WORDS = (
    "the a an of to in on at for with and or is are be box boxes point points trajectory path "
    "waypoint waypoints coordinate coordinates image picture object objects label labels bbox "
    "bbox_2d point_2d answer question think reasoning step first then next finally because so "
    "therefore left right top bottom above below center middle corner edge width height area "
    "number count total sum product solve equation value function return def print import "
    "json list dict true false null robot arm gripper grasp push pull open close move place pick "
    "region mask polygon affordance detection vision language model reward the image shows "
    "there is I see located near far larger smaller color colour red green blue yellow black white"
).split()


def training_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """The built-in corpus: ``n`` short texts rich in digits, JSON punctuation, brackets,
    coordinates and task words (deterministic from ``seed``)."""
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(n):
        o = rng.choice(_OBJECTS)
        kind = i % 8
        if kind == 0:
            out.append(rng.choice(_PROMPTS).format(o=o))
        elif kind == 1:
            box = sorted(rng.sample(range(1000), 2)) + sorted(rng.sample(range(1000), 2))
            box = [box[0], box[2], box[1], box[3]]
            out.append(json.dumps([{"bbox_2d": box, "label": o}]))
        elif kind == 2:
            pts = [[rng.randrange(1000), rng.randrange(1000)] for _ in range(rng.randint(2, 6))]
            out.append(json.dumps({"trajectory": pts}) + " " + str(pts).replace(" ", ""))
        elif kind == 3:
            x, y = rng.randrange(2000), rng.randrange(2000)
            out.append(f'{{"point_2d": [{x}, {y}], "label": "{o}"}} ({x},{y}) ({x}, {y})')
        elif kind == 4:
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 20)))
            out.append(f"<think>{words}.</think><answer>{rng.randrange(100)}</answer>")
        elif kind == 5:
            a, b = rng.randrange(1000), rng.randrange(1000)
            out.append(f"Compute {a} + {b} * 3 = {a + b * 3}. \\frac{{{a}}}{{{b + 1}}} = {a / (b + 1):.3f}; x^2 - {a} = 0")
        elif kind == 6:
            n_ = rng.randrange(10)
            out.append(f"def f(x):\n    return [i * {n_} for i in range(x) if i % 2 == 0]\n\nprint(f({n_}))")
        else:
            out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 30))) + ".")
    return out


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_bpe(vocab_size: int = DEFAULT_BPE_VOCAB, seed: int = 0) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the byte-level BPE; returns ``(vocab, merges)`` ready for ``Qwen2Tokenizer``."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(seed), trainer=trainer)
    spec = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    return dict(spec["vocab"]), merges


def qwen2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """A ``Qwen2Tokenizer`` over ``vocab`` / ``merges`` with the Qwen-VL Instruct checkpoints'
    settings: ``eos_token`` ``<|im_end|>``, ``pad_token`` ``<|endoftext|>``, no bos / unk, no
    clean-up of tokenisation spaces, special tokens never split."""
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )


def build_tokenizer(chat_template: str, vocab_size: int = DEFAULT_BPE_VOCAB, seed: int = 0):
    """A ``Qwen2Tokenizer`` with the Qwen special tokens, the think/answer tags and
    ``chat_template``.  ``eos_token`` is ``<|im_end|>`` and ``pad_token`` ``<|endoftext|>``, as
    in the Qwen-VL Instruct checkpoints."""
    vocab, merges = train_bpe(vocab_size, seed)
    for t in QWEN_SPECIAL_TOKENS + TAG_TOKENS:  # Qwen's order: special tokens right after the BPE
        vocab[t] = len(vocab)
    tokenizer = qwen2_tokenizer(vocab, merges)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tokenizer.chat_template = chat_template
    return tokenizer


def vision_token_ids(tokenizer) -> list[int]:
    """Ids of the vision special tokens present in ``tokenizer`` (pass as ``suppress_tokens``
    when sampling: a random or young policy samples them, and one ``<|image_pad|>`` in a
    completion breaks the next forward pass)."""
    ids = []
    vocab = tokenizer.get_vocab()
    for t in VISION_TOKENS:
        if t in vocab:
            ids.append(int(vocab[t]))
    return ids
