"""The rollout of a batch as a tree, the sampling parameters, and the backend protocol.

For B prompts, K thoughts per prompt and M answers per thought (written TkAm; T16A1 is plain
GRPO with 16 samples, T4A4 spends the same 16 rewards on 4 thoughts):

- a *thought* is the generated text up to and including ``</think>``; a thought that reaches
  ``max_thought_tokens`` without it is closed by appending ``</think>`` and flagged in
  ``thought_truncated`` (the appended token is part of the thought, with the policy's log-prob
  of that token, so the trainer can score it like any other or mask it);
- an *answer* is everything the model generates after its thought up to and including the end
  token (``<|im_end|>``) or the answer length limit (``answer_truncated``).

Ragged token sequences are kept as lists of 1D tensors (no padding), indexed ``[b][k]`` for
thoughts and ``[b][k][m]`` for answers.  The flat order used everywhere (rewards, the training
layout, :meth:`TreeRollout.index`) is prompt-major: ``row = (b * K + k) * M + m``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn.

    ``temperature`` 0 means greedy (argmax).  ``top_k`` 0 and ``top_p`` 1.0 mean off: plain
    sampling from the temperature-scaled distribution (the ``top_k=50`` default of transformers'
    ``GenerationConfig`` is *not* plain sampling).  Vision special tokens are always suppressed.
    The log-probs a rollout returns are those of the full temperature-scaled distribution
    ``log_softmax(logits / temperature)`` (temperature 1 when greedy), before top-k / top-p
    filtering and suppression: the distribution the training forward scores.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_thought_tokens: int = 256
    max_answer_tokens: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_thought_tokens < 1 or self.max_answer_tokens < 1:
            raise ValueError("SamplingParams.max_thought_tokens and max_answer_tokens must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TreeRollout:
    """B prompts x K thoughts x M answers, as sampled.

    Shapes (P_b: prompt b's length without padding; T_bk: thought length incl. ``</think>``;
    A_bkm: answer length incl. the end token when one was generated):

    - ``prompt_ids[b]``: LongTensor [P_b], the prompt as the model read it (chat template
      applied, image placeholders expanded), no padding;
    - ``prompt_mm_token_type_ids[b]``: LongTensor [P_b], 0 text / 1 image / 2 video;
    - ``pixel_values[b]``: FloatTensor [n_patches_b, patch_dim] (the chunk of the processor's flat
      ``pixel_values`` that belongs to prompt b) or None for a text-only prompt;
    - ``image_grid_thw[b]``: LongTensor [n_images_b, 3] or None;
    - ``thought_ids[b][k]``: LongTensor [T_bk]; ``thought_logprobs[b][k]``: FloatTensor [T_bk];
    - ``answer_ids[b][k][m]``: LongTensor [A_bkm]; ``answer_logprobs[b][k][m]``: FloatTensor [A_bkm];
    - ``thought_truncated``: BoolTensor [B, K]; ``answer_truncated``: BoolTensor [B, K, M];
    - ``thought_texts[b][k]``: str (decoded with special tokens), cut right after its first
      ``</think>`` (:mod:`vlm_grpo_ma.format`), after the text the chat template's generation
      prompt already wrote (``"<think>\\n"`` on a Qwen3-VL Thinking template, not in
      ``thought_ids``; ``""`` otherwise), so it is the whole thought on both template kinds;
    - ``answer_texts[b][k][m]``: str (decoded without the final end token), preceded by whatever
      text the thought's last token carried past ``</think>`` (e.g. the ``<`` of Qwen2.5-VL's
      ``><`` token), so ``thought_texts[b][k] + answer_texts[b][k][m]`` is the completion.

    All tensors are on the CPU; log-probs are float32, one per generated token.
    """

    prompt_ids: list[torch.Tensor]
    prompt_mm_token_type_ids: list[torch.Tensor]
    pixel_values: list[torch.Tensor | None]
    image_grid_thw: list[torch.Tensor | None]
    thought_ids: list[list[torch.Tensor]]
    thought_logprobs: list[list[torch.Tensor]]
    thought_truncated: torch.Tensor
    answer_ids: list[list[list[torch.Tensor]]]
    answer_logprobs: list[list[list[torch.Tensor]]]
    answer_truncated: torch.Tensor
    thought_texts: list[list[str]] = field(default_factory=list)
    answer_texts: list[list[list[str]]] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    """Counters of the rollout: ``tokens_prefilled``, ``tokens_decoded`` (forward positions
    actually computed, padding included), ``tokens_generated`` (sampled tokens kept)."""

    @property
    def B(self) -> int:
        return len(self.prompt_ids)

    @property
    def K(self) -> int:
        return len(self.thought_ids[0]) if self.thought_ids else 0

    @property
    def M(self) -> int:
        return len(self.answer_ids[0][0]) if self.answer_ids and self.answer_ids[0] else 0

    def index(self) -> torch.Tensor:
        """LongTensor [B*K*M, 3]: the (prompt, thought, answer) index of each flat row,
        in the order ``row = (b * K + k) * M + m``."""
        b, k, m = torch.meshgrid(
            torch.arange(self.B), torch.arange(self.K), torch.arange(self.M), indexing="ij"
        )
        return torch.stack([b.reshape(-1), k.reshape(-1), m.reshape(-1)], dim=1)

    def flat_pairs(self) -> list[tuple[str, str]]:
        """The (thought_text, answer_text) of each flat row, in :meth:`index` order: what
        ``Task.reward(thought, answer, sample, family)`` takes."""
        return [
            (self.thought_texts[b][k], self.answer_texts[b][k][m])
            for b, k, m in self.index().tolist()
        ]

    def select(self, idx: Sequence[int], *, keep_stats: bool = True) -> "TreeRollout":
        """The sub-tree of prompts ``idx`` (in that order), for micro-batches and dropped prompts.

        Every per-prompt field is sliced by walking the dataclass fields: lists are indexed by
        prompt, tensors along their first (B) dimension, so a field added to this type is sliced
        with the others.  ``stats`` is copied (``keep_stats=False``: empty: the counters of the
        whole rollout do not describe a part)."""
        idx = [int(i) for i in idx]
        kw: dict = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "stats":
                kw[f.name] = dict(v) if keep_stats else {}
            elif torch.is_tensor(v):
                kw[f.name] = v[idx]
            elif isinstance(v, list):
                kw[f.name] = [v[i] for i in idx] if v else []
            else:  # a new kind of field: decide here how it is sliced
                raise TypeError(f"TreeRollout.select: do not know how to slice field {f.name!r} ({type(v).__name__})")
        return TreeRollout(**kw)

    def thought_lengths(self) -> torch.Tensor:
        """LongTensor [B, K]: T_bk."""
        return torch.tensor([[len(t) for t in row] for row in self.thought_ids], dtype=torch.long)

    def answer_lengths(self) -> torch.Tensor:
        """LongTensor [B, K, M]: A_bkm."""
        return torch.tensor(
            [[[len(a) for a in th] for th in row] for row in self.answer_ids], dtype=torch.long
        )


@runtime_checkable
class RolloutBackend(Protocol):
    """What samples completions: the transformers backend (``rollout.hf.HFRolloutBackend``) and
    the vLLM one (``rollout.vllm.VLLMBackend``).  The trainer calls
    ``generate_tree_from_messages`` (RL) and ``generate`` (greedy evaluation); the benchmark runner
    both, through ``bench.backends.complete_with_rollout``.

    ``prompts_inputs`` are the left-padded generation inputs of B prompts as the processor returns
    them (``input_ids`` [B, P], ``attention_mask`` [B, P], ``mm_token_type_ids`` [B, P], and for
    images the flat ``pixel_values`` and ``image_grid_thw``), e.g. from
    ``vlm_grpo_ma.data.collate.build_generation_inputs``."""

    def generate_tree(
        self, prompts_inputs: Mapping[str, Any], K: int, M: int, sampling: SamplingParams
    ) -> TreeRollout:
        """K thoughts per prompt (stopped at ``</think>``), M answers continuing each."""
        ...

    def generate_tree_from_messages(
        self, messages_batch: Sequence[list[dict]], K: int, M: int, sampling: SamplingParams
    ) -> TreeRollout:
        """:meth:`generate_tree` on chat messages, collated with the backend's processor."""
        ...

    def generate(
        self, messages_batch: Sequence[list[dict]], n: int = 1, sampling: SamplingParams | None = None,
        max_new_tokens: int | None = None,
    ) -> list[list[str]]:
        """Completion texts [B][n] in one stage (no stop at ``</think>``), greedy by default."""
        ...


def append_answers(tree: TreeRollout, more: TreeRollout) -> TreeRollout:
    """``tree`` with the answers of ``more`` (same prompts and thoughts) appended to each thought's:
    M = tree.M + more.M, answers of ``tree`` first. Stats are summed."""
    if (tree.B, tree.K) != (more.B, more.K):
        raise ValueError(f"append_answers: trees of {tree.B}x{tree.K} and {more.B}x{more.K} prompts x thoughts")
    join = lambda x, y: [[x[b][k] + y[b][k] for k in range(tree.K)] for b in range(tree.B)]  # noqa: E731
    stats = {key: tree.stats.get(key, 0.0) + more.stats.get(key, 0.0) for key in set(tree.stats) | set(more.stats)}
    return TreeRollout(
        prompt_ids=tree.prompt_ids, prompt_mm_token_type_ids=tree.prompt_mm_token_type_ids,
        pixel_values=tree.pixel_values, image_grid_thw=tree.image_grid_thw, thought_ids=tree.thought_ids,
        thought_logprobs=tree.thought_logprobs, thought_truncated=tree.thought_truncated,
        answer_ids=join(tree.answer_ids, more.answer_ids),
        answer_logprobs=join(tree.answer_logprobs, more.answer_logprobs),
        answer_truncated=torch.cat([tree.answer_truncated, more.answer_truncated], dim=2),
        thought_texts=tree.thought_texts, answer_texts=join(tree.answer_texts, more.answer_texts), stats=stats,
    )


def cat_prompts(trees: Sequence[TreeRollout]) -> TreeRollout:
    """The trees of several prompt batches (same K and M) as one, prompts in order. Stats summed."""
    if len(trees) == 1:
        return trees[0]
    if len({(t.K, t.M) for t in trees}) != 1:
        raise ValueError(f"cat_prompts: trees of different shapes {[(t.K, t.M) for t in trees]}")
    flat = lambda name: [x for t in trees for x in getattr(t, name)]  # noqa: E731
    keys = set().union(*(t.stats for t in trees))
    return TreeRollout(
        prompt_ids=flat("prompt_ids"), prompt_mm_token_type_ids=flat("prompt_mm_token_type_ids"),
        pixel_values=flat("pixel_values"), image_grid_thw=flat("image_grid_thw"), thought_ids=flat("thought_ids"),
        thought_logprobs=flat("thought_logprobs"), thought_truncated=torch.cat([t.thought_truncated for t in trees]),
        answer_ids=flat("answer_ids"), answer_logprobs=flat("answer_logprobs"),
        answer_truncated=torch.cat([t.answer_truncated for t in trees]), thought_texts=flat("thought_texts"),
        answer_texts=flat("answer_texts"), stats={k: sum(t.stats.get(k, 0.0) for t in trees) for k in keys},
    )
