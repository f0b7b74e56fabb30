"""vLLM engine set-up for the rollout backend: engine arguments, the pixel-bounds checks, and
the receiver of synced weights.  Pure functions and small version adapters; vLLM itself is never
imported here (the backend passes its module in).  Split out of :mod:`.vllm`, which re-exports
every public name.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Mapping, Sequence

import torch

log = logging.getLogger(__name__)

__all__ = [
    "PixelBoundsMismatch",
    "VLLMWeightReceiver",
    "build_engine_kwargs",
    "check_pixel_bounds",
    "check_prompt_expansion",
    "collapse_image_pads",
    "count_image_runs",
    "engine_mm_processor_kwargs",
    "pixel_bounds",
]


# --------------------------------------------------------------------------- pixel bounds
class PixelBoundsMismatch(ValueError):
    """The rollout engine would resize images differently from the training processor."""


def pixel_bounds(obj: Any) -> tuple[int | None, int | None]:
    """(min_pixels, max_pixels) of a ModelFamily, a processor / image processor, or a
    ``mm_processor_kwargs`` dict (``min_pixels``/``max_pixels`` keys, or
    ``size={"shortest_edge", "longest_edge"}``).  Missing values are None."""
    def from_size(size: Any, key: str) -> Any:  # a dict, or transformers' SizeDict
        if size is None:
            return None
        return size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)

    def as_ints(lo: Any, hi: Any) -> tuple[int | None, int | None]:
        return (int(lo) if lo is not None else None, int(hi) if hi is not None else None)

    if isinstance(obj, Mapping):
        size = obj.get("size")
        lo = obj["min_pixels"] if obj.get("min_pixels") is not None else from_size(size, "shortest_edge")
        hi = obj["max_pixels"] if obj.get("max_pixels") is not None else from_size(size, "longest_edge")
        return as_ints(lo, hi)
    if hasattr(obj, "min_pixels") and hasattr(obj, "frame"):  # ModelFamily
        return int(obj.min_pixels), int(obj.max_pixels)
    ip = getattr(obj, "image_processor", obj)
    size = getattr(ip, "size", None)
    lo = getattr(ip, "min_pixels", None) or from_size(size, "shortest_edge")
    hi = getattr(ip, "max_pixels", None) or from_size(size, "longest_edge")
    return as_ints(lo, hi)


def check_pixel_bounds(training: Any, engine_mm_kwargs: Mapping[str, Any] | None) -> None:
    """Assert that the engine resizes images with the training processor's bounds.

    Args:
        training: the training side: a :class:`~vlm_grpo_ma.models.family.ModelFamily`, a
            processor or an image processor.
        engine_mm_kwargs: the ``mm_processor_kwargs`` the vLLM engine is (to be) built with.
    Raises:
        PixelBoundsMismatch: a bound differs, or the engine's is not set (vLLM would then use the
            checkpoint's ``preprocessor_config.json``, which a run's overrides do not change).
    """
    t_lo, t_hi = pixel_bounds(training)
    if t_lo is None or t_hi is None:
        raise PixelBoundsMismatch(f"cannot read min_pixels / max_pixels from the training side ({type(training).__name__})")
    e_lo, e_hi = pixel_bounds(engine_mm_kwargs or {})
    problems = []
    for what, t, e in (("min_pixels", t_lo, e_lo), ("max_pixels", t_hi, e_hi)):
        if e is None:
            problems.append(f"{what}: training {t}, engine not set "
                            "(it would fall back to the checkpoint's preprocessor_config)")
        elif e != t:
            problems.append(f"{what}: training {t}, engine {e}")
    if problems:
        raise PixelBoundsMismatch(
            "the vLLM engine and the training processor resize images differently ("
            + "; ".join(problems)
            + "). Images would get other token grids in rollouts than in training, and Qwen2.5-VL's "
            "absolute-pixel coordinates another frame. Build the engine with "
            "mm_processor_kwargs=engine_mm_processor_kwargs(family)."
        )


def engine_mm_processor_kwargs(family: Any) -> dict[str, Any]:
    """The ``mm_processor_kwargs`` that make vLLM's HF processor resize like the training one.

    Qwen2-VL / Qwen2.5-VL take ``min_pixels`` / ``max_pixels`` (vLLM's documented form); Qwen3-VL's
    image processor takes ``size={"shortest_edge", "longest_edge"}``."""
    lo, hi = pixel_bounds(family)
    if getattr(family, "name", None) == "qwen3_vl":
        return {"size": {"shortest_edge": lo, "longest_edge": hi}}
    return {"min_pixels": lo, "max_pixels": hi}


def check_prompt_expansion(expected: Sequence[int], got: Sequence[int], image_pad: int, where: str = "") -> bool:
    """Compare vLLM's expanded prompt with the transformers processor's.

    Returns True when equal, False when vLLM reported no expansion to compare (``got`` has no
    more image pads than one per image).  Raises :class:`PixelBoundsMismatch` when the image token
    counts differ, ValueError when the text differs."""
    expected, got = list(expected), list(got)
    if expected == got:
        return True
    n_exp = sum(1 for t in expected if t == image_pad)
    n_got = sum(1 for t in got if t == image_pad)
    if got == collapse_image_pads(expected, image_pad):
        return False
    if n_exp != n_got:
        raise PixelBoundsMismatch(
            f"{where}vLLM expanded the prompt's images to {n_got} image tokens, the training processor to {n_exp}: "
            "the two resize images differently (check min_pixels / max_pixels on both sides)."
        )
    raise ValueError(f"{where}vLLM's prompt tokens differ from the training processor's (same image token count)")


# --------------------------------------------------------------------------- image pads
def collapse_image_pads(ids: Sequence[int], image_pad: int) -> list[int]:
    """Replace every run of ``image_pad`` by a single one: the unexpanded prompt that vLLM's
    Qwen-VL processor expands itself (verl passes the same ``raw_prompt_ids``)."""
    out: list[int] = []
    for t in ids:
        t = int(t)
        if t == image_pad and out and out[-1] == image_pad:
            continue
        out.append(t)
    return out


def count_image_runs(ids: Sequence[int], image_pad: int) -> int:
    """Number of runs of ``image_pad`` in ``ids`` (one per image)."""
    ids = [int(t) for t in ids]
    return sum(1 for i, t in enumerate(ids) if t == image_pad and (i == 0 or ids[i - 1] != image_pad))


# --------------------------------------------------------------------------- engine (adapters)
def build_engine_kwargs(
    model_path: str,
    family: Any,
    *,
    gpu_memory_utilization: float = 0.3,
    enable_sleep_mode: bool = False,
    dtype: str = "auto",
    max_model_len: int | None = None,
    max_images_per_prompt: int = 1,
    seed: int = 0,
    enforce_eager: bool = False,
    colocate_ranks: int | None = None,
    kv_cache_bytes: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Keyword arguments of ``vllm.LLM`` for a colocated rollout engine (pure).

    Prefix caching is on; images per prompt are limited to ``max_images_per_prompt``; the pixel
    bounds are the family's; ``generation_config="vllm"`` keeps the checkpoint's sampling
    defaults out (every request sets its own); ``logprobs_mode="processed_logprobs"`` asks for
    log-probs after temperature (dropped on versions without it).  With ``colocate_ranks`` > 1
    (one engine per training rank) the executor is ``external_launcher``.  ``kv_cache_bytes`` fixes
    the KV cache's size (``kv_cache_memory_bytes``).  ``extra`` overrides."""
    kw: dict[str, Any] = dict(
        model=str(model_path),
        tokenizer=str(model_path),
        enable_prefix_caching=True,
        gpu_memory_utilization=float(gpu_memory_utilization),
        enable_sleep_mode=bool(enable_sleep_mode),
        dtype=dtype,
        seed=int(seed),
        enforce_eager=bool(enforce_eager),
        limit_mm_per_prompt={"image": int(max_images_per_prompt)},
        mm_processor_kwargs=engine_mm_processor_kwargs(family),
        generation_config="vllm",
        logprobs_mode="processed_logprobs",
    )
    if max_model_len is not None:
        kw["max_model_len"] = int(max_model_len)
    if kv_cache_bytes is not None:  # a fixed KV cache (what the CPU platform needs; see VLLMBackend)
        kw["kv_cache_memory_bytes"] = int(kv_cache_bytes)
    if colocate_ranks is not None and colocate_ranks > 1:
        kw["distributed_executor_backend"] = "external_launcher"
    kw.update(dict(extra or {}))
    return kw


#: engine arguments that may be dropped (with a log line) on vLLM versions that lack them
_OPTIONAL_ENGINE_ARGS = ("generation_config", "logprobs_mode", "kv_cache_memory_bytes")


def _supported_engine_args(vllm: Any, kwargs: dict) -> dict:
    """``kwargs`` minus the optional ones this vLLM's ``EngineArgs`` does not know."""
    try:
        fields = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
    except Exception:  # noqa: BLE001  (not a dataclass in this version: pass everything)
        return kwargs
    out = dict(kwargs)
    for k in _OPTIONAL_ENGINE_ARGS:
        if k in out and k not in fields:
            log.info("vLLM %s has no engine argument %r; left out", getattr(vllm, "__version__", "?"), k)
            out.pop(k)
    if out.get("enable_sleep_mode") and "enable_sleep_mode" not in fields:
        raise RuntimeError(f"vLLM {getattr(vllm, '__version__', '?')} has no sleep mode; set enable_sleep_mode=False")
    return out


_MISSING = object()


def _attr_path(obj: Any, path: str) -> Any:
    """``obj.a.b.c`` for ``path = "a.b.c"``, or :data:`_MISSING` where an attribute is absent
    (the engine internals differ between vLLM versions)."""
    for part in path.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            break
    return obj


def _engine_mm_kwargs(llm: Any) -> Mapping[str, Any] | None:
    """The ``mm_processor_kwargs`` a running engine reports, where it exposes them."""
    for path in ("llm_engine.model_config.mm_processor_kwargs",
                 "llm_engine.model_config.multimodal_config.mm_processor_kwargs"):
        obj = _attr_path(llm, path)
        if isinstance(obj, Mapping):
            return obj
    return None


def _local_vllm_model(llm: Any) -> Any:
    """The engine's ``torch.nn.Module`` when the engine runs in this process, else None."""
    chains = (
        "llm_engine.model_executor.driver_worker.worker.model_runner",  # V1 in-process
        "llm_engine.model_executor.driver_worker.model_runner",  # V0 (and wrappers forwarding .worker)
        "llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner",
    )
    for chain in chains:
        obj = _attr_path(llm, chain)
        if obj is _MISSING:
            continue
        model = _runner_model(obj)
        if model is not None:
            return model
    return None


def _runner_model(runner: Any) -> Any:
    """A model runner's model, unwrapped (``get_model()`` skips CUDA-graph / compile wrappers)."""
    model = runner.get_model() if callable(getattr(runner, "get_model", None)) else getattr(runner, "model", None)
    return model if hasattr(model, "load_weights") else None


def _worker_load_weights(worker: Any, weights: list) -> None:
    """Run on each vLLM worker by ``collective_rpc`` (older vLLM without ``reload_weights``)."""
    model = _runner_model(worker.model_runner)
    if model is None:
        raise RuntimeError("the vLLM worker's model has no load_weights()")
    model.load_weights(weights=weights)


def _local_worker(llm: Any) -> Any:
    """The engine's worker when the engine runs in this process, else None."""
    for chain in ("llm_engine.model_executor.driver_worker",
                  "llm_engine.engine_core.engine_core.model_executor.driver_worker"):
        obj = _attr_path(llm, chain)
        if obj is not _MISSING:
            return getattr(obj, "worker", obj)  # V1 wraps the worker in a WorkerWrapperBase
    return None


def _worker_reprocess_tied_weights(worker: Any) -> int:
    """Run on each vLLM worker after a reload: re-process every layer whose weight is TIED to
    another layer's (a tied ``lm_head``, as in Qwen2.5-VL-3B and Qwen3-VL-2B).  Returns how many.

    vLLM's in-place reload processes a tied parameter through one of its layers only
    (``vllm/model_executor/model_loader/reload/__init__.py``, limitation 2): the embedding's new
    values land in the shared tensor, but the ``lm_head``'s own processed state is not redone.
    On the CPU platform that state is a packed copy of the weight for its GEMM
    (``UnquantizedEmbeddingMethod.process_weights_after_loading``), so without this the logits
    would still come from the OLD embedding: greedy outputs drifted from the trainer's after the
    first sync.  On CUDA that processing is a no-op for unquantized weights, so this costs nothing."""
    model = _runner_model(worker.model_runner)
    if model is None:
        return 0
    owners: dict[int, list[Any]] = {}
    for module in model.modules():
        w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if w is not None and not w.is_meta:
            owners.setdefault(id(w), []).append(module)
    n = 0
    for mods in owners.values():
        for module in mods if len(mods) > 1 else ():
            method = getattr(module, "quant_method", None)
            if method is not None and callable(getattr(method, "process_weights_after_loading", None)):
                method.process_weights_after_loading(module)
                n += 1
    return n


class VLLMWeightReceiver:
    """Loads synced weights into a ``vllm.LLM`` (the receiver of
    :func:`vlm_grpo_ma.rollout.vllm_weights.sync_weights`).

    vLLM has an in-place weight update of its own (0.32 has it), the worker's ``reload_weights``
    (``vllm/model_executor/model_loader/reload/inplace.py``): it restores every layer to its
    checkpoint layout, loads the new checkpoint-format weights through the model's
    ``load_weights``, re-runs each layer's ``process_weights_after_loading`` (the CPU platform
    repacks every linear weight for its GEMM there, so a plain second ``load_weights`` finds no
    loader: ``'Parameter' object has no attribute 'weight_loader'``), copies the results into the
    original tensors (CUDA graphs keep their pointers).  The vision encoder's cached features
    (computed with the old weights) are then dropped (:meth:`_reset_encoder_cache`).  One reload must see ALL weights: a layer whose weights arrive
    in two reloads would be processed half-loaded.  So the whole sync is one call with a lazy
    stream of weights: in-process (the colocated default) the stream is passed by reference and
    each bucket is gathered only when vLLM asks for it; an engine in another process gets the
    weights as one serialised list (slow, whole model in memory: fine for tests and small models).

    vLLM without ``reload_weights`` (older releases) gets ``model.load_weights`` directly, as
    TRL's colocate mode did, and its encoder cache is reset."""

    def __init__(self, llm: Any):
        self.llm = llm

    @property
    def method(self) -> str:
        """``reload_weights`` (vLLM's in-place update) or ``load_weights`` (older vLLM)."""
        worker = _local_worker(self.llm)
        runner = getattr(worker, "model_runner", None) if worker is not None else None
        if worker is not None and not callable(getattr(worker, "reload_weights", None)):
            return "load_weights"
        if runner is not None and not callable(getattr(runner, "reload_weights", None)):
            return "load_weights"
        return "reload_weights"

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load every weight of the model (one pass over ``weights``, checkpoint names)."""
        in_process = _local_worker(self.llm) is not None
        if self.method == "reload_weights" and hasattr(self.llm, "collective_rpc"):
            payload = weights if in_process else [(n, t.detach().cpu()) for n, t in weights]
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": payload, "is_checkpoint_format": True})
            self.llm.collective_rpc(_worker_reprocess_tied_weights)
            self._reset_encoder_cache()
            return
        model = _local_vllm_model(self.llm)
        if model is not None:
            model.load_weights(weights=weights)
        elif hasattr(self.llm, "collective_rpc"):
            self.llm.collective_rpc(_worker_load_weights, args=([(n, t.detach().cpu()) for n, t in weights],))
        else:
            raise RuntimeError(
                "cannot reach the vLLM model to load weights: no in-process model and no LLM.collective_rpc "
                "(set VLLM_ENABLE_V1_MULTIPROCESSING=0 before creating the engine, or upgrade vLLM)"
            )
        self._reset_encoder_cache()

    def _reset_encoder_cache(self) -> None:
        """Forget the vision features computed with the old weights, in the scheduler's encoder
        cache manager AND the worker's cache (``LLMEngine.reset_encoder_cache``).  The worker's
        ``reload_weights`` clears only its own cache: without this the scheduler still believes an
        image's features are cached and the next request fails with "Encoder cache miss"."""
        reset = _attr_path(self.llm, "llm_engine.reset_encoder_cache")
        if callable(reset):
            reset()

    def reset_prefix_cache(self) -> None:
        if not hasattr(self.llm, "reset_prefix_cache"):
            raise RuntimeError("this vLLM has no LLM.reset_prefix_cache(): stale KV would be reused after a weight sync")
        ok = self.llm.reset_prefix_cache()
        if ok is False:  # V1 refuses while requests are running
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?)")
