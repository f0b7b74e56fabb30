"""A random Qwen2.5-VL at chosen widths and image size, for the benchmarks that need compute, not
Python overhead, to set the time (``vs_trl.py``, ``layout_cost.py``).

The shapes follow the released Qwen/Qwen2.5-VL-3B-Instruct ``config.json`` at a chosen width:
text head_dim 128 with 8 query heads per key/value head (3B: 16 heads, 2 KV heads), MLP 5.375x
the hidden size (11008 / 2048), mRoPE sections [16, 24, 24], rope_theta 1e6; the vision tower
with head_dim 80 (1280 / 16), window attention with the last block full. The tokenizer and
chat template are the tiny model's (a small vocabulary: the LM head is then a small share of
the cost, as in the 36-layer release, where it is 8 % of the parameters, rather than the two
thirds it would be in a 2-layer model with the 151,936-row head). The image processor's bounds
are set so that every image becomes ``image_tokens`` visual tokens or a few more (448 x 448
pixels: 256 tokens).

    --hidden 2048 --vision_hidden 1280   the released 3B widths (slow on a CPU)
    --hidden 1024 --vision_hidden 640    half of them (the default of the benchmarks)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


def add_width_args(p) -> None:
    """The model-width and image-size options shared by the benchmarks."""
    p.add_argument("--hidden", type=int, default=0, help="text hidden size of a random Qwen2.5-VL (0: the tiny model)")
    p.add_argument("--layers", type=int, default=2, help="text decoder layers (with --hidden)")
    p.add_argument("--vision_hidden", type=int, default=0, help="vision tower width (0: hidden * 5 / 8, as 1280 / 2048)")
    p.add_argument("--vision_layers", type=int, default=2, help="vision blocks (with --hidden)")
    p.add_argument("--image_tokens", type=int, default=256, help="visual tokens per image (with --hidden)")


def width_label(a) -> str:
    if not a.hidden:
        return "tiny-qwen2.5-vl"
    return (f"qwen2.5-vl h{a.hidden}x{a.layers} v{a.vision_hidden or a.hidden * 5 // 8}x{a.vision_layers} "
            f"img{a.image_tokens}")


def build_wide_model(out_dir: str | Path, *, hidden: int, layers: int, vision_hidden: int = 0, vision_layers: int = 2,
                     image_tokens: int = 256, seed: int = 0) -> Path:
    """Save the random model (fp32), tokenizer and processor into ``out_dir``; return it."""
    from vlm_grpo_ma.models import tiny

    vision_hidden = vision_hidden or hidden * 5 // 8
    heads = max(1, hidden // 128)
    v_heads = max(1, vision_hidden // 80)
    spec = dataclasses.replace(
        tiny.TINY_MODELS["tiny-qwen2.5-vl"], hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=max(1, heads // 8), intermediate_size=hidden * 43 // 8, vision_hidden=vision_hidden,
        vision_layers=vision_layers, vision_heads=v_heads, vision_init_range=0.02, vision_window=True,
        window_size=112, rope_theta=1e6, mrope_section=(16, 24, 24), min_tokens=image_tokens,
        max_tokens=2 * image_tokens,
    )
    name = f"bench-wide-{hidden}-{layers}-{vision_hidden}-{vision_layers}-{image_tokens}"
    tiny.TINY_MODELS[name] = spec
    try:
        return tiny.build_tiny(name, out_dir, seed=seed)
    finally:
        del tiny.TINY_MODELS[name]
