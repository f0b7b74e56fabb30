"""Collation of chat messages into Qwen-VL model inputs, never cutting image tokens.

Messages are in Qwen-VL chat format::

    [{"role": "user", "content": [{"type": "image", "image": "a.jpg"},   # path | file:// | data: | PIL
                                  {"type": "text", "text": "Locate the mug."}]}]

Images are read with :func:`vlm_grpo_ma.data.images.load_image` at their original size and resized
by the processor (so ``image_grid_thw`` and :meth:`ModelFamily.resized_size` agree).

- :func:`build_generation_inputs`: a LEFT-padded batch for ``model.generate`` (prompt ends with
  the assistant header).
- :func:`build_sft_batch`: a RIGHT-padded batch for teacher forcing, the loss only on the
  assistant's target tokens and its closing ``<|im_end|>``.  A sample longer than ``max_length``
  is dropped and reported in ``SFTBatch.dropped``, never truncated (a cut would remove image
  tokens or misalign them with ``pixel_values``).

The prompt is tokenised by the processor exactly as for generation and the target separately
with the tokenizer, then concatenated: the SFT sequence is token for token what a rollout with
that completion would be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .images import load_image

IGNORE_INDEX = -100

Messages = list[dict[str, Any]]


def message_images(messages: Messages) -> list[Any]:
    """The image references of a conversation, in the order the chat template emits
    ``<|image_pad|>`` for them (elements of type ``image`` or with an ``image``/``image_url`` key)."""
    refs = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str) or content is None:
            continue
        for j, item in enumerate(content):
            if item.get("type") == "image" or "image" in item or "image_url" in item:
                ref = item.get("image", item.get("image_url"))
                if isinstance(ref, dict):  # OpenAI style {"image_url": {"url": ...}}
                    ref = ref.get("url")
                if ref is None:
                    raise ValueError(f"message {i}, content item {j}: image element without an 'image' value")
                refs.append(ref)
            elif item.get("type") == "video" or "video" in item:
                raise ValueError(f"message {i}, content item {j}: videos are not supported")
    return refs


def _end_token(tokenizer: Any) -> str:
    """The token that closes an assistant turn (``<|im_end|>`` in Qwen chat models)."""
    vocab = tokenizer.get_vocab()
    return "<|im_end|>" if "<|im_end|>" in vocab else tokenizer.eos_token


def prompt_text(processor: Any, messages: Messages) -> str:
    """The chat-template text of ``messages`` ending with the assistant header."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_generation_inputs(processor: Any, messages_batch: Sequence[Messages]):
    """Left-padded inputs for ``model.generate``.

    Args:
        processor: a Qwen-VL processor.
        messages_batch: B conversations (each a list of chat messages).

    Returns:
        A ``BatchFeature`` with ``input_ids`` (B, T) and ``attention_mask`` (B, T) left-padded,
        ``pixel_values`` (sum of patches, C*t*p*p) and ``image_grid_thw`` (n_images, 3) when there
        are images, and ``mm_token_type_ids`` (B, T) where the processor makes it.
    """
    texts = [prompt_text(processor, m) for m in messages_batch]
    images = [load_image(ref) for m in messages_batch for ref in message_images(m)]
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side


@dataclass
class DroppedSample:
    """A sample left out of a batch.  ``index`` is its position in the input lists."""

    index: int
    length: int
    max_length: int
    reason: str = "longer than max_length"


@dataclass
class SFTBatch:
    """A right-padded teacher-forcing batch.

    Attributes:
        input_ids: (B, T) prompt + target + end token, right-padded with the pad token.
        attention_mask: (B, T) 1 on real tokens.
        labels: (B, T) ``input_ids`` on the target tokens and the closing end token, -100 elsewhere
            (prompt, image tokens, padding).  Not shifted: the model shifts.
        pixel_values: (sum of patches, C*t*p*p) of the kept samples' images, or None.
        image_grid_thw: (n_images, 3), or None.
        mm_token_type_ids: (B, T) 1 on image tokens, 0 elsewhere (needed for M-RoPE positions),
            or None if the processor does not make it.
        kept: index in the input lists of each row.
        dropped: the samples left out, with their lengths.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    mm_token_type_ids: torch.Tensor | None = None
    kept: list[int] = field(default_factory=list)
    dropped: list[DroppedSample] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def model_inputs(self, with_labels: bool = False) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward (labels only if asked)."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        if with_labels:
            out["labels"] = self.labels
        return out

    def to(self, device: Any) -> "SFTBatch":
        moved = {
            k: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for k, v in self.__dict__.items()
        }
        return SFTBatch(**moved)


def build_sft_batch(
    processor: Any,
    prompts_messages: Sequence[Messages],
    target_texts: Sequence[str],
    max_length: int,
) -> SFTBatch:
    """Teacher-forcing batch: each prompt (with its images) followed by its target text and the
    end-of-turn token; loss only on target + end token.

    Args:
        processor: a Qwen-VL processor.
        prompts_messages: B conversations that end where the assistant should speak.
        target_texts: B assistant replies (e.g. ``"<think>...</think><answer>...</answer>"``).
        max_length: longest sequence kept, in tokens (image tokens included).  Longer samples are
            dropped and listed in ``dropped``, never truncated.

    Returns:
        An :class:`SFTBatch` of the kept samples (possibly empty: ``len(batch) == 0``).
    """
    if len(prompts_messages) != len(target_texts):
        raise ValueError(f"{len(prompts_messages)} prompts but {len(target_texts)} targets")
    tokenizer = processor.tokenizer
    end_id = tokenizer.convert_tokens_to_ids(_end_token(tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id

    rows: list[tuple[list[int], list[int], list[int]]] = []  # ids, labels, mm types
    pixels, grids, kept, dropped = [], [], [], []
    has_mm = False
    for i, (messages, target) in enumerate(zip(prompts_messages, target_texts)):
        images = [load_image(ref) for ref in message_images(messages)]
        enc = processor(text=[prompt_text(processor, messages)], images=images or None, return_tensors="pt")
        prompt_ids = enc["input_ids"][0].tolist()
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [end_id]
        length = len(prompt_ids) + len(target_ids)
        if length > max_length:
            dropped.append(DroppedSample(index=i, length=length, max_length=max_length))
            continue
        mm = enc.get("mm_token_type_ids")
        has_mm = has_mm or mm is not None
        mm_row = (mm[0].tolist() if mm is not None else [0] * len(prompt_ids)) + [0] * len(target_ids)
        rows.append((prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids, mm_row))
        if "pixel_values" in enc:
            pixels.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])
        kept.append(i)

    T = max((len(r[0]) for r in rows), default=0)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mm_types = torch.zeros((B, T), dtype=torch.long)
    for b, (ids, lab, mm_row) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        attention[b, :n] = 1
        labels[b, :n] = torch.tensor(lab)
        mm_types[b, :n] = torch.tensor(mm_row)
    return SFTBatch(
        input_ids=input_ids,
        attention_mask=attention,
        labels=labels,
        pixel_values=torch.cat(pixels, 0) if pixels else None,
        image_grid_thw=torch.cat(grids, 0) if grids else None,
        mm_token_type_ids=mm_types if has_mm else None,
        kept=kept,
        dropped=dropped,
    )
