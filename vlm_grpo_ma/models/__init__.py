"""Qwen-VL models: one loader for a policy, the model family and its coordinate codec, and the
tiny random models for tests and the offline demo.

Public API:
    load_policy(name_or_path, *, dtype, attn_implementation, gradient_checkpointing,
                min_pixels, max_pixels, device) -> Policy
    Policy(model, processor, family, tokenizer, path, completion_prefix)
    generation_prefix(processor) -> str   ("" plain template, "<think>\n" Qwen3-VL Thinking)
    template_kind(processor) -> str       ("plain" | "thinking"; UnknownChatTemplate otherwise)
    ModelFamily                       (family.py: the coordinate codec)
    TINY_MODELS                       (tiny model name -> TinySpec)
    ensure_tiny(name) -> Path         (build-or-reuse the cached tiny checkpoint folder)
    vision_token_ids(tokenizer)       (ids to pass as ``suppress_tokens`` when sampling)
"""

from .chat_templates import TEMPLATE_KINDS, UnknownChatTemplate, generation_prefix, template_kind
from .family import ModelFamily, smart_resize
from .loading import MODEL_CLASSES, Policy, load_policy, resolve_model_path, unwrap_model
from .tiny import TINY_MODELS, ensure_tiny, resolve_tiny_name
from .tokenizer import vision_token_ids

__all__ = [
    "MODEL_CLASSES",
    "ModelFamily",
    "Policy",
    "TEMPLATE_KINDS",
    "TINY_MODELS",
    "UnknownChatTemplate",
    "ensure_tiny",
    "generation_prefix",
    "load_policy",
    "resolve_model_path",
    "resolve_tiny_name",
    "smart_resize",
    "template_kind",
    "unwrap_model",
    "vision_token_ids",
]
