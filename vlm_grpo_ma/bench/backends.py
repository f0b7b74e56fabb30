"""Prediction backends: chat messages in, completion texts out.

- ``hf`` (default): transformers, through the rollout package's :class:`HFRolloutBackend`
  (batched left-padded decoding, vision tokens suppressed, greedy unless sampling is asked for;
  best-of-K x M samples a real tree: K thoughts, M answers continuing each).
- ``vllm``: :class:`vlm_grpo_ma.rollout.vllm.VLLMBackend` (an optional extra, imported lazily),
  a rollout backend of the same protocol as the transformers one, behind the same adapter
  (:func:`complete_with_rollout`); a clear error says what is missing when vLLM is not installed.

- ``reference``: no model; every completion is the task's SFT target for the sample (its
  reference answer in the suite's coordinate family).  A sanity check of a suite: its data,
  parser and metrics must give the best scores.

A backend exposes ``family`` (the :class:`ModelFamily` of the processor it loaded), ``name`` and
``complete(samples, messages_batch, gen, seed) -> list[list[str]]`` (B prompts x K*M
completions, the k-th thought's m-th answer at index ``k * M + m``).
"""

from __future__ import annotations

import os
from typing import Any, Protocol, Sequence

from vlm_grpo_ma.bench.suite import GenerationSpec

__all__ = ["Backend", "BackendUnavailable", "HFBackend", "ReferenceBackend", "load_backend"]


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not installed, no GPU, ...)."""


class Backend(Protocol):
    name: str
    family: Any

    def complete(self, samples: Sequence[Any], messages_batch: Sequence[list[dict]], gen: GenerationSpec,
                 seed: int) -> list[list[str]]:
        ...


def _sampling(gen: GenerationSpec, seed: int):
    from vlm_grpo_ma.rollout.types import SamplingParams

    half = max(1, gen.max_new_tokens // 2)
    return SamplingParams(
        temperature=float(gen.temperature) if gen.do_sample else 0.0,
        top_p=float(gen.top_p),
        top_k=int(gen.top_k),
        max_thought_tokens=max(1, gen.max_new_tokens - half),
        max_answer_tokens=half,
        seed=int(seed),
    )


class HFBackend:
    """transformers generation on one device.

    Args:
        model: a tiny model name, a checkpoint folder or a hub id (``load_policy``).
        min_pixels, max_pixels: processor resize bounds (the family follows them).
        device: ``None`` picks ``cuda:$LOCAL_RANK`` when CUDA is there, else the CPU.
        dtype: ``None`` picks bfloat16 on CUDA and float32 on the CPU.
    """

    name = "hf"

    def __init__(self, model: str, *, min_pixels: int | None = None, max_pixels: int | None = None,
                 device: Any = None, dtype: Any = None, attn_implementation: str | None = None):
        import torch

        from vlm_grpo_ma.models import load_policy
        from vlm_grpo_ma.rollout.hf import HFRolloutBackend

        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        if dtype is None:
            dtype = "bfloat16" if str(device).startswith("cuda") else None
        self.policy = load_policy(model, dtype=dtype, device=device, min_pixels=min_pixels, max_pixels=max_pixels,
                                  attn_implementation=attn_implementation)
        self.policy.model.eval()
        self.family = self.policy.family
        self.model_path = self.policy.path
        self._rollout = HFRolloutBackend(self.policy.model, processor=self.policy.processor)

    def complete(self, samples: Sequence[Any], messages_batch: Sequence[list[dict]], gen: GenerationSpec,
                 seed: int) -> list[list[str]]:
        return complete_with_rollout(self._rollout, messages_batch, gen, seed)


def complete_with_rollout(rollout: Any, messages_batch: Sequence[list[dict]], gen: GenerationSpec,
                          seed: int) -> list[list[str]]:
    """Completions [B][K*M] from a rollout backend of the project's protocol (``generate(messages,
    n, sampling, max_new_tokens)`` and ``generate_tree_from_messages(messages, K, M, sampling)``):
    greedy -> one completion; sampling with M = 1 -> K independent completions; M > 1 -> a tree
    (thought k's answer m at index ``k * M + m``)."""
    sampling = _sampling(gen, seed)
    if not gen.do_sample:
        return rollout.generate(messages_batch, n=1, sampling=sampling, max_new_tokens=gen.max_new_tokens)
    K, M = max(1, gen.num_thoughts), max(1, gen.num_answers)
    if M == 1:
        return rollout.generate(messages_batch, n=K, sampling=sampling, max_new_tokens=gen.max_new_tokens)
    tree = rollout.generate_tree_from_messages(messages_batch, K, M, sampling)
    return [
        [tree.thought_texts[b][k] + tree.answer_texts[b][k][m] for k in range(K) for m in range(M)]
        for b in range(tree.B)
    ]


class RolloutAdapter:
    """A bench backend over any rollout backend of the project's protocol and its family."""

    def __init__(self, rollout: Any, family: Any, name: str, model_path: str = ""):
        self.rollout, self.family, self.name, self.model_path = rollout, family, name, model_path

    def complete(self, samples: Sequence[Any], messages_batch: Sequence[list[dict]], gen: GenerationSpec,
                 seed: int) -> list[list[str]]:
        return complete_with_rollout(self.rollout, messages_batch, gen, seed)


class ReferenceBackend:
    """Answers every prompt with the task's reference (SFT target) text; loads no model.

    Args:
        task: the suite's task instance.
        family: the coordinate family the answers are written in (default Qwen2.5-VL).
    """

    name = "reference"

    def __init__(self, task: Any, family: Any = None, **_: Any):
        from vlm_grpo_ma.models.family import ModelFamily

        self.task = task
        self.family = family or ModelFamily.from_model_type("qwen2_5_vl")
        self.model_path = "reference"

    def complete(self, samples: Sequence[Any], messages_batch: Sequence[list[dict]], gen: GenerationSpec,
                 seed: int) -> list[list[str]]:
        return [[self.task.sft_target(s, self.family)] * gen.num_samples for s in samples]


def _vllm_backend(model: str, *, min_pixels: int | None = None, max_pixels: int | None = None, device: Any = None,
                  dtype: Any = None, attn_implementation: str | None = None, **kw: Any) -> Backend:
    """``--backend vllm``: the project's vLLM rollout backend (:class:`vlm_grpo_ma.rollout.vllm.VLLMBackend`)
    behind :class:`RolloutAdapter`.  ``device`` and ``attn_implementation`` are transformers
    options (ignored: vLLM picks its own); ``gpu_memory_utilization`` defaults to 0.85 (nothing
    else on the GPU; on vLLM's CPU platform the KV cache is sized by ``kv_cache_bytes``)."""
    try:
        from vlm_grpo_ma.rollout.vllm import VLLMBackend
    except ModuleNotFoundError as e:
        raise BackendUnavailable(
            "--backend vllm needs vLLM and the project's vLLM rollout backend "
            f"(vlm_grpo_ma/rollout/vllm.py): {e}. Install it with `pip install 'vlm-grpo-ma[vllm]'` "
            "(CUDA) or `bash scripts/setup_vllm.sh` (CPU), or use --backend hf."
        ) from e
    kw.setdefault("gpu_memory_utilization", 0.85)
    if dtype is not None:
        kw["dtype"] = str(dtype).replace("torch.", "")
    try:
        be = VLLMBackend(model, min_pixels=min_pixels, max_pixels=max_pixels, **kw)
    except ImportError as e:
        raise BackendUnavailable(f"--backend vllm: vLLM is not importable here ({e}); use --backend hf") from e
    return RolloutAdapter(be, be.family, "vllm", getattr(be, "model_path", model))


def load_backend(kind: str, model: str, task: Any = None, **kw: Any) -> Backend:
    """``hf``, ``vllm`` or ``reference`` backend for ``model``."""
    if kind == "reference":
        from vlm_grpo_ma.models.family import ModelFamily

        fam = ModelFamily.from_model_type(model) if model in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl") else None
        return ReferenceBackend(task, fam)
    if kind == "hf":
        return HFBackend(model, **kw)
    if kind == "vllm":
        return _vllm_backend(model, **kw)
    raise ValueError(f"unknown backend {kind!r}; choose hf, vllm or reference")
