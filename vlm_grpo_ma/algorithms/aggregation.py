r"""Token weights of the loss aggregation over a tree of K thoughts x M answers per prompt.

The loss is a weighted sum over the UNIQUE trained tokens of a batch::

    loss = sum_t w_t * l_t

where a thought's tokens are counted once (not once per answer that continues it) and every
answer's tokens once. A token's weight depends only on the segment it belongs to, so the weights
are given per segment: ``w_thought [B, K]`` is the weight of each token of thought k of prompt b,
``w_answer [B, K, M]`` the weight of each token of answer m of that thought.

Notation: ``T_k`` tokens in thought k, ``A_km`` tokens in answer m of thought k, ``P = B*K*M``
paths (a path is one (thought, answer) pair, i.e. one GRPO completion when M = 1).

``token-mean`` (default)
    every unique token weighs ``1 / (sum_k T_k + sum_km A_km)`` (sums over the whole batch):
    the mean over all trained tokens (DAPO, verl's default).
``seq-mean-token-mean`` (original GRPO)
    a path (k, m) owns 1/M of its thought, so its length is ``L_km = T_k / M + A_km``; the loss is
    the mean over the P paths of each path's token mean. An answer token weighs
    ``1 / (P L_km)``, a thought token ``sum_m 1 / (M P L_km)``.
``seq-mean-token-sum``
    the mean over paths of each path's token sum: every unique token weighs ``1 / P``.
``seq-mean-token-sum-norm`` (Dr.GRPO)
    every unique token weighs ``1 / (P L_max)``, ``L_max`` given (the generation budget, constant
    over training as Dr.GRPO asks) or the longest path ``max_km (T_k + A_km)`` of the batch.

With M = 1 a path is a plain completion (its thought then its answer) and each mode gives the
weights of verl's ``agg_loss`` on a [G, T] loss matrix with G = B*K rows, with one difference
that is a constant factor: verl's ``seq-mean-token-sum-norm`` divides the sum over all tokens by
the padded length only, here (as in Dr.GRPO's own code) the per-sequence sums are also averaged
over the P sequences.

A path whose thought and answer are both empty weighs nothing but still counts in P (verl would
divide by zero there).

Data parallelism (:func:`cross_rank_scale`): each rank computes the weights above over its OWN
batch, and DeepSpeed divides every micro-batch loss by the accumulation steps G and averages the
gradients over the W ranks. Multiplying a rank's weights by ``cross_rank_scale`` makes that average
the weights of the whole global batch computed on one rank, so W ranks take the step 1 rank takes
on the same rollouts.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["AGGREGATION_MODES", "aggregation_weights", "cross_rank_scale", "expand_to_tokens", "expand_to_paths"]

AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _check_lengths(thought_lens: torch.Tensor, answer_lens: torch.Tensor) -> None:
    if thought_lens.dim() != 2 or answer_lens.dim() != 3 or answer_lens.shape[:2] != thought_lens.shape:
        raise ValueError(
            f"expected thought_lens [B, K] and answer_lens [B, K, M], got {tuple(thought_lens.shape)} "
            f"and {tuple(answer_lens.shape)}"
        )
    if (thought_lens < 0).any() or (answer_lens < 0).any():
        raise ValueError("segment lengths must be non-negative")


def aggregation_weights(
    mode: str,
    thought_lens: torch.Tensor,
    answer_lens: torch.Tensor,
    max_len: Optional[int] = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss weights of each thought and each answer segment (see the module docstring).

    Args:
        mode: one of ``AGGREGATION_MODES``.
        thought_lens: [B, K] number of trained tokens of each thought.
        answer_lens: [B, K, M] number of trained tokens of each answer.
        max_len: ``L_max`` of ``seq-mean-token-sum-norm`` (ignored by the other modes); default
            the longest path ``T_k + A_km`` in the batch.
        dtype: floating dtype of the result (computed in float64).

    Returns:
        ``(w_thought [B, K], w_answer [B, K, M])``: the weight of EACH token of that segment.
        ``sum(w_thought * thought_lens) + sum(w_answer * answer_lens)`` is 1 for ``token-mean``
        and ``seq-mean-token-mean`` (when no path is empty).
    """
    _check_lengths(thought_lens, answer_lens)
    t = thought_lens.to(torch.float64)  # [B, K]
    a = answer_lens.to(torch.float64)  # [B, K, M]
    b, k, m = a.shape
    paths = b * k * m
    if mode == "token-mean":
        n = t.sum() + a.sum()
        w = 1.0 / n if n > 0 else torch.zeros((), dtype=torch.float64)
        w_t, w_a = w.expand(b, k).clone(), w.expand(b, k, m).clone()
    elif mode == "seq-mean-token-mean":
        path_len = t.unsqueeze(-1) / m + a  # [B, K, M]
        w_a = torch.where(path_len > 0, 1.0 / (paths * path_len), torch.zeros_like(path_len))
        w_t = (w_a / m).sum(dim=-1)  # [B, K]
    elif mode == "seq-mean-token-sum":
        w_t = torch.full((b, k), 1.0 / max(paths, 1), dtype=torch.float64)
        w_a = torch.full((b, k, m), 1.0 / max(paths, 1), dtype=torch.float64)
    elif mode == "seq-mean-token-sum-norm":
        if max_len is None:
            longest = (t.unsqueeze(-1) + a).max() if paths > 0 else torch.zeros((), dtype=torch.float64)
        else:
            if max_len <= 0:
                raise ValueError(f"max_len must be positive, got {max_len}")
            longest = torch.tensor(float(max_len), dtype=torch.float64)
        w = 1.0 / (paths * longest) if longest > 0 else torch.zeros((), dtype=torch.float64)
        w_t, w_a = w.expand(b, k).clone(), w.expand(b, k, m).clone()
    else:
        raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {AGGREGATION_MODES}")
    return w_t.to(dtype), w_a.to(dtype)


def cross_rank_scale(mode: str, local_tokens: float, global_tokens: float, world_size: int, grad_accum: int = 1) -> float:
    r"""Factor on one rank's :func:`aggregation_weights` so that DeepSpeed's averaging gives the
    global aggregation.

    DeepSpeed applies ``1/(W G) * sum_{ranks r, micro-batches} grad(loss)``: every micro-batch
    loss is divided by the G accumulation steps and the gradients are averaged over the W ranks.
    A rank's weights (computed over its whole local batch, all micro-batches together) times

    * ``G * W * n_r / N`` for ``token-mean`` (``n_r`` this rank's trained tokens, ``N`` all ranks'):
      a token then weighs ``1/(W G) * G W n_r / N * 1/n_r = 1/N``, the global token mean;
    * ``G`` for the path modes: every rank holds the same number of paths ``P/W``, so the average
      over ranks of per-rank path means is the global path mean (and the Dr.GRPO ``L_max`` is the
      constant budget, the same on every rank).

    Args:
        mode: one of ``AGGREGATION_MODES``.
        local_tokens: ``n_r``, the trained tokens of this rank (thought tokens once).
        global_tokens: ``N``, their sum over the ranks (an all-reduce); 0 gives a factor of 0.
        world_size: W, the number of data-parallel ranks.
        grad_accum: G, the gradient-accumulation steps per optimizer step.

    Returns:
        a float; multiply both ``w_thought`` and ``w_answer`` by it.
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {AGGREGATION_MODES}")
    if world_size < 1 or grad_accum < 1:
        raise ValueError(f"world_size and grad_accum must be >= 1, got {world_size} and {grad_accum}")
    if mode != "token-mean":
        return float(grad_accum)
    if global_tokens <= 0:
        return 0.0
    return world_size * float(local_tokens) / float(global_tokens) * grad_accum


def expand_to_tokens(
    thought_values: torch.Tensor,
    answer_values: torch.Tensor,
    thought_lens: torch.Tensor,
    answer_lens: torch.Tensor,
) -> torch.Tensor:
    """Repeat per-segment values over the unique tokens of a tree, flattened.

    Token order (the packed layout): for each prompt b, for each thought k: the T_k thought tokens,
    then the A_k1 tokens of answer 1, ..., the A_kM tokens of answer M.

    Args:
        thought_values: [B, K] (an advantage, a weight, ...) for every token of thought k.
        answer_values: [B, K, M] for every token of answer m of thought k.
        thought_lens: [B, K] and answer_lens: [B, K, M] integer segment lengths.

    Returns:
        [N] with ``N = sum(thought_lens) + sum(answer_lens)``, dtype of the promoted inputs.
    """
    _check_lengths(thought_lens, answer_lens)
    values = torch.cat([thought_values.unsqueeze(-1), answer_values.to(thought_values.dtype)], dim=-1)  # [B, K, 1+M]
    lens = torch.cat([thought_lens.unsqueeze(-1), answer_lens], dim=-1).to(torch.long)  # [B, K, 1+M]
    return torch.repeat_interleave(values.reshape(-1), lens.reshape(-1))


def expand_to_paths(
    thought_values: torch.Tensor,
    answer_values: torch.Tensor,
    thought_lens: torch.Tensor,
    answer_lens: torch.Tensor,
    max_len: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment values laid out as the naive layout: one right-padded row per path.

    Row ``(b*K + k)*M + m`` holds the T_k thought tokens then the A_km answer tokens. Every
    thought appears in M rows, so to reproduce a unique-token weighted sum with this layout pass
    ``w_thought / M`` as the thought values of the weights.

    Returns:
        ``(values [P, L], mask [P, L])`` with P = B*K*M, L = ``max_len`` or the longest path;
        mask is True on real tokens, values are 0 on padding.
    """
    _check_lengths(thought_lens, answer_lens)
    b, k, m = answer_lens.shape
    t = thought_lens.unsqueeze(-1).expand(b, k, m).reshape(-1).to(torch.long)  # [P]
    a = answer_lens.reshape(-1).to(torch.long)  # [P]
    tv = thought_values.unsqueeze(-1).expand(b, k, m).reshape(-1)  # [P]
    av = answer_values.reshape(-1).to(tv.dtype)  # [P]
    longest = int((t + a).max().item()) if t.numel() else 0
    length = longest if max_len is None else max_len
    if length < longest:
        raise ValueError(f"max_len={max_len} is shorter than the longest path ({longest} tokens)")
    pos = torch.arange(length).unsqueeze(0)  # [1, L]
    in_thought = pos < t.unsqueeze(1)
    mask = pos < (t + a).unsqueeze(1)
    values = torch.where(in_thought, tv.unsqueeze(1), torch.where(mask, av.unsqueeze(1), torch.zeros_like(av).unsqueeze(1)))
    return values, mask
