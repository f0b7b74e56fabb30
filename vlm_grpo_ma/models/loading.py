"""One loader for a policy: a tiny model name, a local checkpoint folder or a hub id.

>>> policy = load_policy("tiny-qwen2.5-vl")                      # doctest: +SKIP
>>> policy = load_policy("Qwen/Qwen2.5-VL-3B-Instruct", dtype="bfloat16",
...                      attn_implementation="flash_attention_2")  # doctest: +SKIP

Tiny names resolve to the cached build (:mod:`vlm_grpo_ma.models.tiny`); everything then goes
through the same ``from_pretrained`` code.  The model class comes from ``config.model_type``, and
the :class:`~vlm_grpo_ma.models.family.ModelFamily` reads patch size, merge size and pixel bounds
from the processor actually loaded (after any ``min_pixels`` / ``max_pixels`` override), so the
coordinate codec and the processor always agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .chat_templates import generation_prefix
from .family import MODEL_CLASSES, ModelFamily  # noqa: F401  (MODEL_CLASSES re-exported)
from .processor import load_processor
from .tiny import ensure_tiny, resolve_tiny_name


@dataclass
class Policy:
    """A loaded Qwen-VL policy.

    Attributes:
        model: the ``*ForConditionalGeneration`` model.
        processor: its processor (image-only where torchvision is missing).
        family: the model family and coordinate codec, with the processor's resize parameters.
        tokenizer: ``processor.tokenizer``.
        path: the folder or hub id it was loaded from (tiny names resolved to their cache folder).
        completion_prefix: what the chat template's generation prompt already wrote of every
            completion: ``""`` (plain template) or ``"<think>\n"`` (Qwen3-VL Thinking);
            :func:`vlm_grpo_ma.models.chat_templates.generation_prefix`.
    """

    model: Any
    processor: Any
    family: ModelFamily
    tokenizer: Any
    path: str = ""
    completion_prefix: str = ""


def unwrap_model(model: Any) -> Any:
    """The ``*ForConditionalGeneration`` module under PEFT / DeepSpeed wrappers."""
    if hasattr(model, "module") and not hasattr(model, "lm_head"):  # DeepSpeed engine / DDP
        model = model.module
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model


def resolve_model_path(name_or_path: str, seed: int = 0) -> str:
    """A tiny model name -> its cached folder (built on first use); anything else unchanged."""
    tiny = resolve_tiny_name(str(name_or_path))
    if tiny is not None and not _is_local_dir(str(name_or_path)):
        return str(ensure_tiny(tiny, seed=seed))
    return str(name_or_path)


def _is_local_dir(path: str) -> bool:
    import os

    return os.path.isdir(path)


def _as_dtype(dtype: Any):
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(dtype), str(dtype)).replace("torch.", "")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'bfloat16', 'float16', 'float32' or 'auto'")
    return value


def load_policy(
    name_or_path: str,
    *,
    dtype: Any = None,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    device: Any = None,
    seed: int = 0,
    **model_kwargs: Any,
) -> Policy:
    """Load model, processor and family.

    Args:
        name_or_path: a tiny model name (``tiny-qwen2-vl``, ``tiny-qwen2.5-vl``,
            ``tiny-qwen3-vl``), a local checkpoint folder or a hub id.
        dtype: torch dtype or its name (``"bfloat16"``, ``"auto"``); ``None`` keeps
            transformers' default.
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``, ... (``None``: default).
        gradient_checkpointing: enable non-reentrant activation checkpointing (and disable the
            KV cache during training forwards, as transformers requires).
        min_pixels, max_pixels: override the processor's image resize bounds (the family
            follows them; pass the same values to vLLM).
        device: move the model there (``None``: leave it where ``from_pretrained`` put it).
        seed: seed of a tiny model's weights (ignored for real checkpoints).
        **model_kwargs: passed to ``from_pretrained`` (e.g. ``device_map``, ``revision``).

    Raises:
        ValueError: the checkpoint is not a supported Qwen-VL model type.
    """
    import transformers
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path, seed=seed)
    config = AutoConfig.from_pretrained(path)
    model_type = config.model_type
    if model_type not in MODEL_CLASSES:
        raise ValueError(
            f"{name_or_path}: model_type {model_type!r} is not a supported Qwen-VL family; supported: {sorted(MODEL_CLASSES)}"
        )
    processor = load_processor(path, model_type, min_pixels=min_pixels, max_pixels=max_pixels)
    family = ModelFamily.from_processor(model_type, processor)
    # a chat template the project cannot continue (not Qwen's, or a generation prompt other than
    # nothing / "<think>") stops here, before the weights load, with the reason
    prefix = generation_prefix(processor)

    kwargs = dict(model_kwargs)
    if dtype is not None:
        kwargs["dtype"] = _as_dtype(dtype)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model_cls = getattr(transformers, MODEL_CLASSES[model_type])
    model = model_cls.from_pretrained(path, config=config, **kwargs)
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if device is not None:
        model = model.to(device)
    return Policy(model=model, processor=processor, family=family, tokenizer=processor.tokenizer, path=path,
                  completion_prefix=prefix)
