r"""What a "sequence" is on a GRPO-MA tree, for the sequence-level importance ratios (GSPO family).

GSPO (Zheng et al., 2025, arXiv 2507.18071) replaces the per-token ratio by one ratio per sampled
sequence, the length-normalised likelihood ratio::

    s_i = exp( (1 / |y_i|) sum_t log( pi_theta(y_it) / pi_old(y_it) ) )

and clips ``s_i`` against the sequence's advantage. Its argument: the reward, hence the advantage,
belongs to a whole sampled unit, so the off-policy correction and the trust region should be on
that unit's likelihood, not on single tokens.

On a tree of K thoughts x M answers the units that own an advantage are the SEGMENTS:

* thought k is sampled ONCE (stage 1) and shared by its M answers; its advantage ``A^T_k`` is
  computed from the thought value ``V_k = mean_m r_km``, a property of the thought alone. Its
  tokens form one sequence, ratio ``pi_theta(t_k) / pi_old(t_k)`` length-normalised over ``T_k``;
* answer m of thought k is sampled from ``pi(. | prompt, t_k)``; its advantage ``A^A_km`` comes
  from its own reward. Its tokens form one sequence, ratio ``pi_theta(a_km | t_k) /
  pi_old(a_km | t_k)`` length-normalised over ``A_km``.

Taking the whole path (thought + answer) as the sequence instead would count the thought M times,
each time mixed with a different answer's ratio and clipped against that answer's advantage; the
thought's own advantage would then be clipped by ratios of tokens it did not choose.

With M = 1 a thought and its single answer are one GRPO completion with ONE advantage (the
thought value is the answer's reward, ``A^T_k = A^A_k1``), so the path is one sequence: exactly
TRL's ``importance_sampling_level="sequence"`` on the concatenated completion. That is why
:func:`tree_sequence_ids` merges the two segments when M = 1.

Token order is the canonical flat order of the training layout (``expand_to_tokens``): for each
prompt b, each thought k: its T_bk tokens, then answer 0's A_bk0 tokens, ..., answer M-1's.
"""

from __future__ import annotations

from typing import Optional

import torch

from .aggregation import expand_to_tokens

__all__ = ["tree_sequence_ids", "segment_mean", "segment_sum"]


def tree_sequence_ids(thought_lens: torch.Tensor, answer_lens: torch.Tensor) -> torch.Tensor:
    """Sequence id of every trained token of a tree, canonical order.

    Args:
        thought_lens: [B, K] token counts of the thoughts; answer_lens: [B, K, M] of the answers.

    Returns:
        [N] long, N = ``sum(thought_lens) + sum(answer_lens)``. For M > 1 every segment (a thought,
        an answer) is its own sequence; for M = 1 a thought and its answer share one id (the path
        is one completion, see the module docstring). Ids are in ``0 .. S-1`` with S the number of
        sequences (segments of length 0 keep their id, holding no tokens).
    """
    b, k, m = answer_lens.shape
    if m == 1:
        per_path = torch.arange(b * k, dtype=torch.long).reshape(b, k)
        t_ids, a_ids = per_path, per_path.unsqueeze(-1)
    else:
        seg = torch.arange(b * k * (m + 1), dtype=torch.long).reshape(b, k, m + 1)
        t_ids, a_ids = seg[..., 0], seg[..., 1:]
    return expand_to_tokens(t_ids, a_ids, thought_lens, answer_lens).to(torch.long)


def segment_sum(values: torch.Tensor, seq_ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token sum over the token's sequence: ``out_t = sum_{u: id_u = id_t, mask_u} values_u``.

    Args:
        values: [N] (gradients flow through it); seq_ids: [N] long; mask: [N] bool, the tokens that
            count (all if None).

    Returns:
        [N], each token's sequence total.
    """
    if values.shape != seq_ids.shape:
        raise ValueError(f"values {tuple(values.shape)} and seq_ids {tuple(seq_ids.shape)} must have one shape")
    if values.numel() == 0:
        return values
    x = values if mask is None else torch.where(mask, values, torch.zeros_like(values))
    s = int(seq_ids.max()) + 1
    totals = torch.zeros(s, dtype=x.dtype, device=x.device).index_add(0, seq_ids, x)
    return totals[seq_ids]


def segment_mean(values: torch.Tensor, seq_ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token mean over the token's sequence (over its ``mask`` tokens; 0 for a sequence with none).

    Shapes as :func:`segment_sum`; returns [N].
    """
    if values.numel() == 0:
        return values
    keep = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
    total = segment_sum(values, seq_ids, keep)
    count = segment_sum(keep.to(values.dtype), seq_ids)
    return total / count.clamp(min=1)
