r"""Overlong handling on the tree (DAPO, arXiv 2503.14476, section 3.4): filtering and soft punishment.

**Overlong filtering** (``mask_truncated_completions`` in TRL): a completion cut by the length limit
has a reward that judges the cut, not the reasoning, so its tokens leave the loss. Per segment:

* a truncated answer masks its own tokens;
* a truncated thought masks its thought tokens (it was closed with ``</think>`` by the sampler);
  its answers are complete continuations of it and keep their tokens;
* a thought ALL of whose answers were truncated is masked too: its advantage comes from the thought
  value ``V_k = mean_m r_km``, and none of those rewards judged a finished answer.

With M = 1 the last rule makes a path (thought + its one answer) leave the loss whole when its answer
was truncated: TRL's rule for one completion that does not end in an end token.

Masked tokens leave the aggregation too (``aggregation_weights`` of the kept lengths: the token mean
counts only kept tokens; a path still counts in the path means), as TRL zeroes their
``completion_mask``.

**Soft overlong punishment** (DAPO eq. 13; TRL ``trl.rewards.get_soft_overlong_punishment``): with
budget ``L_max`` and a cache of ``L_cache`` tokens before it, a length L adds::

    0                                   if L <= L_max - L_cache
    (L_max - L_cache - L) / L_cache     if L_max - L_cache < L <= L_max
    -1                                  if L > L_max

to the reward. On the tree each segment has its own budget (``max_thought_tokens``,
``max_answer_tokens``): the pair (k, m) gets ``factor * (p(T_k) + p(A_km))``, so a long thought
lowers the reward of all its answers (its value V_k) and a long answer its own.
"""

from __future__ import annotations

import torch

from .aggregation import aggregation_weights

__all__ = ["truncation_keep", "kept_aggregation_weights", "soft_overlong_penalty", "tree_overlong_penalty"]


def truncation_keep(thought_truncated: torch.Tensor, answer_truncated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which segments stay in the loss under overlong filtering (module docstring).

    Args:
        thought_truncated: [B, K] bool; answer_truncated: [B, K, M] bool.

    Returns:
        ``(keep_thought [B, K], keep_answer [B, K, M])`` bool.
    """
    if thought_truncated.dim() != 2 or answer_truncated.dim() != 3 or answer_truncated.shape[:2] != thought_truncated.shape:
        raise ValueError(f"expected [B, K] and [B, K, M], got {tuple(thought_truncated.shape)} and "
                         f"{tuple(answer_truncated.shape)}")
    t, a = thought_truncated.bool(), answer_truncated.bool()
    keep_answer = ~a
    keep_thought = ~t & keep_answer.any(dim=-1)
    return keep_thought, keep_answer


def kept_aggregation_weights(
    mode: str,
    thought_lens: torch.Tensor,
    answer_lens: torch.Tensor,
    keep_thought: torch.Tensor,
    keep_answer: torch.Tensor,
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``aggregation_weights`` of the kept segments only: computed on the kept lengths (a masked
    segment counts 0 tokens; every path still counts in P), then 0 on masked segments.

    Args: lengths [B, K] / [B, K, M], keep masks of the same shapes (``truncation_keep``), the
    aggregation ``mode`` and its ``max_len``. Returns ``(w_thought [B, K], w_answer [B, K, M])``.
    """
    t = thought_lens * keep_thought
    a = answer_lens * keep_answer
    w_t, w_a = aggregation_weights(mode, t, a, max_len=max_len)
    return w_t * keep_thought, w_a * keep_answer


def soft_overlong_penalty(lengths: torch.Tensor, max_len: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment of each length (module docstring), float32, in [-1, 0].

    Args:
        lengths: [...] integer token counts; max_len: ``L_max``; cache: ``L_cache``, 0 < cache <= max_len.
    """
    if not 0 < cache <= max_len:
        raise ValueError(f"overlong cache must be in (0, max_len={max_len}], got {cache}")
    L = lengths.to(torch.float32)
    start = float(max_len - cache)
    p = (start - L) / cache
    return torch.where(L <= start, torch.zeros_like(L), torch.where(L <= max_len, p, torch.full_like(L, -1.0)))


def tree_overlong_penalty(
    thought_lens: torch.Tensor,
    answer_lens: torch.Tensor,
    max_thought: int,
    max_answer: int,
    cache: int,
    factor: float = 1.0,
) -> torch.Tensor:
    """Penalty [B, K, M] to add to the rewards: ``factor * (p(T_k) + p(A_km))``, each segment against
    its own budget with the same ``cache`` (capped at that budget).

    Args:
        thought_lens: [B, K]; answer_lens: [B, K, M]; max_thought, max_answer: the budgets;
        cache: ``L_cache`` tokens; factor: scale of the penalty (DAPO uses 1).
    """
    pt = soft_overlong_penalty(thought_lens, max_thought, min(cache, max_thought))
    pa = soft_overlong_penalty(answer_lens, max_answer, min(cache, max_answer))
    return factor * (pt.unsqueeze(-1) + pa)
