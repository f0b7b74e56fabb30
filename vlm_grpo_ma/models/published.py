"""The published architectures of the released Qwen-VL checkpoints, with random weights.

For memory measurements at real widths without downloading a checkpoint: the values below are
those of the released ``config.json`` / ``preprocessor_config.json`` of Qwen/Qwen2.5-VL-3B-Instruct
and Qwen/Qwen3-VL-2B-Instruct (Hugging Face hub).  ``text_layers`` / ``vision_layers`` give a
reduced-depth model of the same widths (the window / full-attention block indexes and deepstack
indexes are kept where they still fall inside the reduced tower).  The tokenizer is the real
vocabulary (:mod:`vlm_grpo_ma.models.real_vocab`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: name -> (model_type, text config, vision config, image processor kwargs)
PUBLISHED: dict[str, tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "qwen2.5-vl-3b": (
        "qwen2_5_vl",
        dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
             intermediate_size=11008, rms_norm_eps=1e-6, max_position_embeddings=128000,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
             tie_word_embeddings=True),
        dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
             temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=2048,
             hidden_act="silu"),
        dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136, max_pixels=12845056,
             image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]),
    ),
    "qwen3-vl-2b": (
        "qwen3_vl",
        dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
             intermediate_size=6144, rms_norm_eps=1e-6, max_position_embeddings=262144,
             rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                              "mrope_interleaved": True},
             tie_word_embeddings=True),
        dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16, spatial_merge_size=2,
             temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
             out_hidden_size=2048, hidden_act="gelu_pytorch_tanh"),
        dict(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=65536, max_pixels=16777216,
             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
    ),
}


def published_config(name: str, text_layers: int | None = None, vision_layers: int | None = None, tokenizer: Any = None):
    """The transformers config of ``name`` (``"qwen2.5-vl-3b"``, ``"qwen3-vl-2b"``), optionally
    with fewer text / vision layers."""
    from transformers import AutoConfig

    from .real_vocab import MODEL_VOCAB_SIZE

    if name not in PUBLISHED:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(PUBLISHED)}")
    model_type, text, vision, _ = PUBLISHED[name]
    text, vision = dict(text), dict(vision)
    if text_layers is not None:
        text["num_hidden_layers"] = int(text_layers)
    if vision_layers is not None:
        depth = int(vision_layers)
        vision["depth"] = depth
        if "fullatt_block_indexes" in vision:  # keep the published ones inside; the last block full
            vision["fullatt_block_indexes"] = sorted({i for i in vision["fullatt_block_indexes"] if i < depth} | {depth - 1})
        if "deepstack_visual_indexes" in vision:
            kept = [i for i in vision["deepstack_visual_indexes"] if i < depth]
            vision["deepstack_visual_indexes"] = kept or [depth - 1]
    if "deepstack_visual_indexes" in vision and len(vision["deepstack_visual_indexes"]) > text["num_hidden_layers"]:
        vision["deepstack_visual_indexes"] = vision["deepstack_visual_indexes"][: text["num_hidden_layers"]]
    ids = {"<|im_end|>": 151645, "<|endoftext|>": 151643, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
           "<|vision_start|>": 151652, "<|vision_end|>": 151653}
    text.update(vocab_size=MODEL_VOCAB_SIZE, bos_token_id=151643, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    return AutoConfig.for_model(
        model_type, text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )


def build_random_checkpoint(name: str, out_dir: str | Path, *, text_layers: int | None = None,
                            vision_layers: int | None = None, dtype: str = "bfloat16", seed: int = 0,
                            max_pixels: int | None = None) -> Path:
    """Save ``name``'s architecture with random weights, the real tokenizer, the published
    image processor (``max_pixels`` optionally lowered) and the chat template into ``out_dir``."""
    import torch
    import transformers

    from .family import MODEL_CLASSES
    from .processor import has_torchvision, image_only_processor_class, save_processor
    from .real_vocab import load_real_tokenizer

    model_type, _, _, ip_kwargs = PUBLISHED[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = published_config(name, text_layers, vision_layers)
    cls = getattr(transformers, MODEL_CLASSES[model_type])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, dtype))
        try:
            model = cls(config)
        finally:
            torch.set_default_dtype(prev)
    model.save_pretrained(out, safe_serialization=True)
    del model
    tokenizer = load_real_tokenizer(model_type)
    kw = dict(ip_kwargs)
    if max_pixels is not None:
        kw["max_pixels"] = int(max_pixels)
    ip_cls = getattr(transformers, "Qwen2VLImageProcessor" if has_torchvision() else "Qwen2VLImageProcessorPil")
    processor = image_only_processor_class(model_type)(image_processor=ip_cls(**kw), tokenizer=tokenizer,
                                                       chat_template=tokenizer.chat_template)
    save_processor(processor, out)
    (out / "published_arch.json").write_text(json.dumps(
        {"name": name, "text_layers": text_layers, "vision_layers": vision_layers, "dtype": dtype, "seed": seed}))
    return out
