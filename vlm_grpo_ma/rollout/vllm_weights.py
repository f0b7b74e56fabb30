"""Weight sync from the trainer to a colocated vLLM engine (ZeRO-3 and LoRA aware).

After each optimizer step the rollout engine must generate with the trainer's new weights.
What this module does, in order (the facts come from TRL's colocate mode, ``_move_model_to_vllm``,
and verl's sharding managers; the code is ours):

1. **Names.**  The trainer's parameter names are turned into the names of a Hugging Face
   checkpoint (:func:`checkpoint_name`): PEFT's ``base_model.model.`` prefix and ``.base_layer``
   infix are stripped, LoRA factors (``lora_A`` / ``lora_B`` / ...) are not sent, PEFT's
   ``modules_to_save.<adapter>.`` copy replaces its ``original_module``.  Those are exactly the names
   vLLM's ``model.load_weights`` reads from a checkpoint: vLLM applies its own
   ``hf_to_vllm_mapper`` to them.  :func:`hf_to_vllm_name` mirrors that mapper for the three Qwen-VL
   families (transformers >= 4.52 names ``model.language_model.*`` / ``model.visual.*`` /
   ``lm_head.*``, and the older ``model.layers.*`` / ``visual.*`` names for Qwen2-VL and
   Qwen2.5-VL); it is used to check that every name lands in a vLLM module, and by tests.
2. **Bounded gathering.**  Parameters are grouped into units (one parameter, or one LoRA layer:
   its base weight and its LoRA factors, which must be gathered together to merge) and the units
   into buckets of at most ``bucket_bytes`` full-size bytes (:func:`plan_units`,
   :func:`plan_buckets`; a unit larger than the bound is a bucket of its own).  Under DeepSpeed
   ZeRO-3 each bucket is gathered with ``deepspeed.zero.GatheredParameters(..., modifier_rank=None)``
   (every rank takes part, in the same order), sent, and released: the whole model is never
   gathered at once.  TRL gathers one parameter at a time; a bucket of a few hundred MB makes
   fewer, larger copies.
3. **LoRA.**  Inside the gather, each LoRA layer is merged with PEFT's own ``layer.merge()`` (what
   ``merge_adapter()`` does for every layer; it covers LoRA, DoRA, embeddings, LoRA bias), its
   merged base weights are copied out, and it is unmerged with ``layer.unmerge()``.  The base
   weights are then restored bit for bit from a copy taken before the merge, so repeated syncs
   never drift the trained weights (merge then unmerge is not exact in bf16).
4. **Prefix cache.**  The engine's prefix cache holds KV computed with the old weights: it is reset
   after every sync (``receiver.reset_prefix_cache()``).

The receiver is anything with ``load_weights(list[(name, tensor)])`` and ``reset_prefix_cache()``
(:class:`WeightReceiver`); :class:`vlm_grpo_ma.rollout.vllm.VLLMWeightReceiver` is the one for a
``vllm.LLM``.  Every rank of a colocated run calls :func:`sync_weights` with its own engine.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import torch

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "SyncStats",
    "WeightReceiver",
    "WeightUnit",
    "checkpoint_name",
    "hf_to_vllm_name",
    "iter_weight_buckets",
    "param_nbytes",
    "plan_buckets",
    "plan_units",
    "sync_weights",
    "unwrap_for_sync",
]

#: default bound of one gathered bucket (full-size bytes)
DEFAULT_BUCKET_BYTES = 512 * 1024**2

# --------------------------------------------------------------------------- names
_LORA_PARAM = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.|$)")
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+\.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DeepSpeed / DDP wrappers, torch.compile
_PEFT_PREFIX = "base_model.model."

#: vLLM's ``hf_to_vllm_mapper.orig_to_new_prefix`` of each family, in vLLM's order.  vLLM applies
#: every matching rule in turn (``WeightsMapper._map_name``), and so does :func:`hf_to_vllm_name`.
VLLM_PREFIX_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    # vllm/model_executor/models/qwen2_vl.py and qwen2_5_vl.py
    "qwen2_vl": (
        ("model.language_model.", "language_model.model."),  # transformers >= 4.52 checkpoints
        ("model.visual.", "visual."),
        ("lm_head.", "language_model.lm_head."),  # original checkpoints
        ("model.", "language_model.model."),
    ),
    "qwen2_5_vl": (
        ("model.language_model.", "language_model.model."),
        ("model.visual.", "visual."),
        ("lm_head.", "language_model.lm_head."),
        ("model.", "language_model.model."),
    ),
    # vllm/model_executor/models/qwen3_vl.py (released with the new names only)
    "qwen3_vl": (
        ("model.visual.", "visual."),
        ("lm_head.", "language_model.lm_head."),
        ("model.language_model.", "language_model.model."),
    ),
}
#: the top-level modules of vLLM's Qwen-VL models: every mapped name must start with one
VLLM_TOP_MODULES = ("visual.", "language_model.model.", "language_model.lm_head.")


def checkpoint_name(name: str) -> str | None:
    """The Hugging Face checkpoint name of a trainer parameter, or None if it is not sent.

    >>> checkpoint_name("base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.language_model.layers.0.self_attn.q_proj.weight'
    >>> checkpoint_name("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight")
    >>> checkpoint_name("lm_head.weight")
    'lm_head.weight'
    """
    for prefix in _WRAPPER_PREFIXES:
        name = name.removeprefix(prefix)
    name = name.removeprefix(_PEFT_PREFIX)
    if _LORA_PARAM.search(name) or ".original_module." in name:
        return None
    name = _MODULES_TO_SAVE.sub(".", name)
    return name.replace(".base_layer.", ".")


def hf_to_vllm_name(name: str, family: str) -> str:
    """vLLM's module path of a checkpoint name, as vLLM's ``hf_to_vllm_mapper`` of ``family``
    (``"qwen2_vl"``, ``"qwen2_5_vl"``, ``"qwen3_vl"``) computes it.

    vLLM's ``load_weights`` then fuses ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into
    ``gate_up_proj`` itself (its ``stacked_params_mapping``); this function stops before that.

    Raises:
        ValueError: unknown family, or a name that lands in no vLLM module (e.g. pre-4.52 names
            for Qwen3-VL, which vLLM does not map).
    """
    if family not in VLLM_PREFIX_RULES:
        raise ValueError(f"no vLLM name mapping for family {family!r}; supported: {sorted(VLLM_PREFIX_RULES)}")
    out = name
    for old, new in VLLM_PREFIX_RULES[family]:
        if out.startswith(old):
            out = new + out[len(old):]
    if not out.startswith(VLLM_TOP_MODULES):
        raise ValueError(
            f"parameter {name!r} maps to {out!r}, which is in no module of vLLM's {family} model "
            f"(expected a name under {', '.join(VLLM_TOP_MODULES)})"
        )
    return out


# --------------------------------------------------------------------------- planning (pure)
@dataclass(frozen=True)
class WeightUnit:
    """Parameters gathered and sent together.

    ``params``: indices into the model's ``named_parameters()`` list; ``lora_module``: the module
    path (as in ``named_modules()``) of a PEFT LoRA layer whose parameters these are, else None."""

    params: tuple[int, ...]
    lora_module: str | None = None


def _lora_module_of(name: str) -> str | None:
    """The PEFT layer a parameter belongs to (``X`` of ``X.base_layer.*`` / ``X.lora_A.*``)."""
    i = name.find(".base_layer.")
    if i >= 0:
        return name[:i]
    m = _LORA_PARAM.search(name)
    return name[: m.start()] if m else None


def plan_units(names: Sequence[str]) -> list[WeightUnit]:
    """Group parameter names into units, in order of first appearance.

    A PEFT LoRA layer ``X`` (``X.base_layer.weight``, ``X.base_layer.bias``, ``X.lora_A.<ad>.weight``,
    ``X.lora_B.<ad>.weight``, ...) is one unit: merging needs all of them at once.  Every other
    parameter is a unit of its own.  Every index appears in exactly one unit."""
    units: list[list[int]] = []
    module_of_unit: list[str | None] = []
    where: dict[str, int] = {}
    for i, name in enumerate(names):
        mod = _lora_module_of(name)
        if mod is None:
            units.append([i])
            module_of_unit.append(None)
        elif mod in where:
            units[where[mod]].append(i)
        else:
            where[mod] = len(units)
            units.append([i])
            module_of_unit.append(mod)
    return [WeightUnit(tuple(u), m) for u, m in zip(units, module_of_unit)]


def plan_buckets(sizes: Sequence[int], max_bytes: int) -> list[list[int]]:
    """Consecutive buckets of item indices whose sizes sum to at most ``max_bytes``.

    Greedy and order-preserving: an item joins the current bucket unless that would pass the
    bound; an item larger than the bound is a bucket of its own.  Every index appears exactly
    once, in increasing order.

    Args:
        sizes: [U] bytes of each item (unit).
        max_bytes: the bound, > 0.
    """
    if max_bytes <= 0:
        raise ValueError(f"bucket size must be > 0 bytes, got {max_bytes}")
    buckets: list[list[int]] = []
    cur: list[int] = []
    cur_bytes = 0
    for i, s in enumerate(sizes):
        if cur and cur_bytes + s > max_bytes:
            buckets.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += int(s)
    if cur:
        buckets.append(cur)
    return buckets


# --------------------------------------------------------------------------- the sync
@runtime_checkable
class WeightReceiver(Protocol):
    """Where synced weights go (a vLLM engine, or a test double that records them).

    ``load_weights`` is called ONCE per sync with a lazy stream of every (checkpoint name,
    tensor): vLLM's in-place reload must see all of a layer's weights in one update.  A tensor is
    valid while the receiver consumes it (the stream gathers ZeRO-3 buckets on demand)."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def reset_prefix_cache(self) -> None: ...


@dataclass
class SyncStats:
    """What one sync sent: tensors, bytes (as sent), buckets, wall seconds, and the names."""

    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0
    names: list[str] = field(default_factory=list)


def is_zero3_param(p: torch.nn.Parameter) -> bool:
    """Whether ``p`` is partitioned by DeepSpeed ZeRO-3 (it then carries ``ds_id``)."""
    return hasattr(p, "ds_id")


def param_nbytes(p: torch.nn.Parameter) -> int:
    """Full (gathered) size of a parameter in bytes; ZeRO-3 partitions report ``ds_numel``."""
    numel = int(getattr(p, "ds_numel", p.numel()))
    return numel * p.element_size()


def unwrap_for_sync(model_or_engine: Any) -> torch.nn.Module:
    """The module whose parameters are synced: a DeepSpeed engine's (or DDP's) ``.module``; a
    PEFT model is kept (its LoRA layers are merged while sending)."""
    m = model_or_engine
    while isinstance(getattr(m, "module", None), torch.nn.Module) and (
        hasattr(m, "zero_optimization_stage") or type(m).__name__ in ("DeepSpeedEngine", "DistributedDataParallel")
    ):
        m = m.module
    return m


def _gathered(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    if any(is_zero3_param(p) for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _merged_base_tensors(layer: Any, base_params: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Merge a PEFT LoRA layer, copy out its merged base parameters, unmerge, and restore the
    base parameters bit for bit.  Returns {parameter name: merged copy}."""
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        # already merged (forward uses the merged weight) or adapters off (forward uses the base)
        return {n: p.data for n, p in base_params}
    saved = [p.data.clone() for _, p in base_params]
    layer.merge()
    try:
        merged = {n: p.data.clone() for n, p in base_params}
    finally:
        layer.unmerge()
        for (_, p), s in zip(base_params, saved):
            p.data.copy_(s)
    return merged


def iter_weight_buckets(
    model_or_engine: Any, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield the model's weights as lists of (checkpoint name, tensor), one bucket at a time.

    The tensors of a bucket are valid only until the next bucket is requested (under ZeRO-3
    they are the gathered parameters, released when the iteration moves on): consume each list
    before asking for the next.  Order is ``named_parameters()`` order (stable across ranks).
    """
    model = unwrap_for_sync(model_or_engine)
    named = list(model.named_parameters())  # tied parameters appear once
    units = plan_units([n for n, _ in named])
    sizes = [sum(param_nbytes(named[i][1]) for i in u.params) for u in units]
    modules = dict(model.named_modules()) if any(u.lora_module for u in units) else {}
    for bucket in plan_buckets(sizes, bucket_bytes):
        params = [named[i][1] for u in bucket for i in units[u].params]
        with _gathered(params):
            out: list[tuple[str, torch.Tensor]] = []
            for u in bucket:
                unit = units[u]
                merged: dict[str, torch.Tensor] = {}
                if unit.lora_module is not None:
                    base = [named[i] for i in unit.params if ".base_layer." in named[i][0]]
                    layer = modules.get(unit.lora_module)
                    if layer is None or not hasattr(layer, "merge"):
                        raise RuntimeError(f"{unit.lora_module}: LoRA parameters but no PEFT layer with merge()")
                    merged = _merged_base_tensors(layer, base)
                for i in unit.params:
                    name, p = named[i]
                    ckpt = checkpoint_name(name)
                    if ckpt is not None:
                        t = merged.get(name)
                        if t is None:  # a gathered ZeRO-3 tensor is released after its bucket: copy it
                            t = p.data.clone() if is_zero3_param(p) else p.data
                        out.append((ckpt, t))
            yield out


def sync_weights(
    model_or_engine: Any,
    receiver: WeightReceiver,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    family: str | None = None,
) -> SyncStats:
    """Send every weight of the trainer's model to ``receiver``, then reset its prefix cache.

    The weights go as one lazy stream (``receiver.load_weights`` is called once): bucket after
    bucket is gathered (ZeRO-3) only when the receiver reaches it, so at most one bucket is
    gathered at a time.  Gathered ZeRO-3 tensors are sent as copies: a receiver may keep a
    reference past its bucket (vLLM's in-place reload buffers a layer's weights until the layer is
    complete, and a layer may straddle two buckets).

    Args:
        model_or_engine: a DeepSpeed engine, a PEFT model or a transformers model.
        receiver: ``load_weights(iterable of (name, tensor))`` + ``reset_prefix_cache()``.
        bucket_bytes: bound on the full-size bytes gathered at once (ZeRO-3).
        family: if given, every name is checked with :func:`hf_to_vllm_name` before sending.
    Returns:
        :class:`SyncStats`.  All ranks must call this together under ZeRO-3 (the gathers are
        collective).
    Raises:
        RuntimeError: the receiver did not consume every weight (a partial update).
    """
    t0 = time.perf_counter()
    stats = SyncStats()
    done = [False]

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for batch in iter_weight_buckets(model_or_engine, bucket_bytes):
            if family is not None:
                for name, _ in batch:
                    hf_to_vllm_name(name, family)
            stats.buckets += 1
            stats.tensors += len(batch)
            stats.bytes += sum(t.numel() * t.element_size() for _, t in batch)
            stats.names.extend(n for n, _ in batch)
            yield from batch
        done[0] = True

    receiver.load_weights(stream())
    if not done[0]:
        raise RuntimeError(f"the weight receiver stopped after {stats.tensors} tensors: the engine was only partly "
                           "updated (it must consume every weight of the stream)")
    receiver.reset_prefix_cache()
    stats.seconds = time.perf_counter() - t0
    return stats
