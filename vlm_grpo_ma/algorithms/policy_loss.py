r"""The clipped surrogate policy loss (PPO / GRPO / DAPO / GSPO) over weighted trained tokens.

Per trained token t with advantage A_t and ratio ``rho_t = pi_theta(y_t) / pi_old(y_t)``::

    l_t  = max(-A_t rho_t, -A_t clip(rho_t, 1 - clip_low, 1 + clip_high)) + beta * KL_t
    loss = sum_t w_t l_t

``clip_high > clip_low`` is DAPO's clip-higher. ``KL_t`` is a per-token estimator of
KL(pi_theta || pi_ref) (k3 by default, see ``kl.py``) and ``beta = kl_coef``. The weights ``w_t``
carry the aggregation mode (``aggregation.py``): for a GRPO-MA tree each unique token appears
once, thought tokens with the thought advantage A^T_k, answer tokens with the answer advantage
A^A_km. Because the function works on flat tokens it serves any layout (one packed row per
thought, or the naive K*M rows with thought weights divided by M).

Sequence-level ratios (GSPO, arXiv 2507.18071; TRL's ``importance_sampling_level="sequence"``):
given ``seq_ids`` (``sequences.tree_sequence_ids``: a thought is one sequence, each answer one;
the path when M = 1), every token of sequence i uses the same ratio
``s_i = exp(mean_{t in i, w_t > 0} (log pi_theta(y_t) - log pi_old(y_t)))`` in place of rho_t,
with the gradient through the mean. The other losses of the registry (``policy_loss_variants``:
CISPO, SAPO, VESPO) share :func:`importance_log_ratio` and the KL part.
"""

from __future__ import annotations

from typing import Optional

import torch

from .aggregation import aggregation_weights
from .registry import get_kl_estimator, register_policy_loss
from .sequences import segment_mean

__all__ = ["clipped_policy_loss", "masked_clipped_policy_loss", "masked_agg_weights", "importance_log_ratio",
           "kl_part", "ratio_metrics"]

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def check_loss_inputs(logp, old_logp, advantages, weights, seq_ids, ref_logp, kl_coef) -> None:
    """Shape and argument checks shared by every registered policy loss."""
    if not (logp.shape == old_logp.shape == advantages.shape == weights.shape):
        raise ValueError(
            f"logp, old_logp, advantages, weights must have one shape, got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(advantages.shape)}, {tuple(weights.shape)}"
        )
    if seq_ids is not None and seq_ids.shape != logp.shape:
        raise ValueError(f"seq_ids must have the shape of logp {tuple(logp.shape)}, got {tuple(seq_ids.shape)}")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")


def importance_log_ratio(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    weights: torch.Tensor,
    seq_ids: Optional[torch.Tensor] = None,
    log_ratio_clamp: float = 20.0,
) -> torch.Tensor:
    """Per-token log importance ratio [N] (with gradient through ``logp``).

    ``seq_ids`` None: token level, ``log pi_theta(y_t) - log pi_old(y_t)``. Given ([N] long):
    sequence level (GSPO), the mean of the token log-ratios over the token's sequence, trained
    tokens only (``weights > 0``; TRL's ``(log_ratio * mask).sum(-1) / mask.sum(-1)``). The
    result is clamped to +-``log_ratio_clamp`` (verl uses 20) so that its exp never overflows.
    """
    log_ratio = logp - old_logp.detach()
    if seq_ids is not None:
        log_ratio = segment_mean(log_ratio, seq_ids, weights.detach() > 0)
    return log_ratio.clamp(min=-log_ratio_clamp, max=log_ratio_clamp)


def kl_part(logp, ref_logp, weights, kl_coef, kl_estimator, kl_clamp):
    """``(kl [N], kl_term)``: the per-token KL estimate and ``kl_coef * sum_t w_t KL_t`` (0 without a reference)."""
    if ref_logp is not None:
        kl = get_kl_estimator(kl_estimator)(logp, ref_logp.detach(), clamp=kl_clamp)  # [N]
        return kl, kl_coef * (weights * kl).sum()
    return torch.zeros_like(logp), torch.zeros((), dtype=logp.dtype, device=logp.device)


@torch.no_grad()
def ratio_metrics(ratio, weights, kl, policy_term, kl_term, clipped_low, clipped_high) -> dict[str, torch.Tensor]:
    """The metrics every policy loss returns (see :func:`clipped_policy_loss`), detached 0-dim tensors."""
    trained = weights > 0
    n = trained.sum().clamp(min=1).to(ratio.dtype)
    r = ratio.detach()
    one = torch.ones((), dtype=r.dtype, device=r.device)
    inf = torch.full((), float("inf"), dtype=r.dtype, device=r.device)
    any_trained = trained.any()  # tensor ops only: no host sync
    ratio_max = torch.where(any_trained, torch.where(trained, r, -inf).amax(), one) if r.numel() else one
    ratio_min = torch.where(any_trained, torch.where(trained, r, inf).amin(), one) if r.numel() else one
    return {
        "loss/policy": policy_term.detach(),
        "loss/kl": kl_term.detach(),
        "kl/mean": (kl.detach() * trained).sum() / n,
        "clip/low": (clipped_low & trained).sum() / n,
        "clip/high": (clipped_high & trained).sum() / n,
        "ratio/mean": torch.where(any_trained, (r * trained).sum() / n, one),
        "ratio/max": ratio_max,
        "ratio/min": ratio_min,
    }


@register_policy_loss("clipped")
def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_clamp: Optional[float] = 10.0,
    kl_estimator: str = "k3",
    log_ratio_clamp: float = 20.0,
    seq_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss with optional KL penalty, summed with per-token weights.

    Args:
        logp: [N] log pi_theta of the trained tokens (carries the gradient).
        old_logp: [N] log pi_old (the sampling policy), no gradient.
        advantages: [N] per-token advantages, no gradient.
        weights: [N] aggregation weights; a token of weight 0 does not count (padding).
        clip_low: eps_low, the ratio is clipped below at 1 - clip_low.
        clip_high: eps_high, clipped above at 1 + clip_high (DAPO clip-higher when > clip_low).
        ref_logp: [N] log pi_ref of the reference policy; required when ``kl_coef > 0``.
        kl_coef: beta, the weight of the KL penalty in the loss.
        kl_clamp: clamp of the log-ratio inside the KL estimator (see ``kl.py``).
        kl_estimator: registered KL estimator name (``k1``, ``k2``, ``k3``).
        log_ratio_clamp: ``log rho`` is clamped to +-this before the exp (verl uses 20).
        seq_ids: [N] long sequence ids (``sequences.tree_sequence_ids``) for sequence-level
            ratios (GSPO); None (default) for per-token ratios.

    Returns:
        ``(loss, metrics)``: loss is a 0-dim tensor; metrics are detached 0-dim tensors (call
        ``.item()`` when logging; kept as tensors to avoid a device sync per metric):

        - ``loss/policy``: ``sum_t w_t * pg_t``, the surrogate part of the loss;
        - ``loss/kl``: ``kl_coef * sum_t w_t * KL_t``, the KL part (0 without a reference);
        - ``kl/mean``: plain mean of KL_t over trained tokens (0 without a reference);
        - ``clip/low``: fraction of trained tokens with ``A < 0`` and ``rho < 1 - clip_low``;
        - ``clip/high``: fraction of trained tokens with ``A > 0`` and ``rho > 1 + clip_high``;
          these are exactly the tokens whose gradient the clip zeroes;
        - ``ratio/mean``, ``ratio/max``, ``ratio/min``: of rho over trained tokens (1 if none);
          at sequence level rho is the token's sequence ratio (so ``clip/*`` count the tokens of
          clipped sequences).

        "Trained tokens" are those with ``weight > 0``; fractions and means are plain
        (unweighted) averages over them, every unique token counted once.
    """
    check_loss_inputs(logp, old_logp, advantages, weights, seq_ids, ref_logp, kl_coef)
    advantages = advantages.detach().to(logp.dtype)
    weights = weights.detach().to(logp.dtype)

    ratio = torch.exp(importance_log_ratio(logp, old_logp, weights, seq_ids, log_ratio_clamp))
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)  # [N]
    policy_term = (weights * pg).sum()
    kl, kl_term = kl_part(logp, ref_logp, weights, kl_coef, kl_estimator, kl_clamp)
    loss = policy_term + kl_term if kl_coef > 0 else policy_term
    r = ratio.detach()
    metrics = ratio_metrics(r, weights, kl, policy_term, kl_term,
                            (advantages < 0) & (r < 1.0 - clip_low), (advantages > 0) & (r > 1.0 + clip_high))
    return loss, metrics


def masked_agg_weights(mask: torch.Tensor, mode: str = "token-mean", max_len: Optional[int] = None) -> torch.Tensor:
    """Aggregation weights of a plain [G, T] completion batch (each row one completion).

    The M = 1 case of :func:`~vlm_grpo_ma.algorithms.aggregation.aggregation_weights` (the one
    place the four modes are defined): each row is a path of ``L_i = sum(mask[i])`` tokens and no
    answer, so ``token-mean`` -> 1/sum(mask); ``seq-mean-token-mean`` -> 1/(G * L_i);
    ``seq-mean-token-sum`` -> 1/G; ``seq-mean-token-sum-norm`` -> 1/(G * L_max) with
    ``L_max = max_len`` or T (the padded length, as verl). Returns [G, T] float64 weights, 0 where
    ``mask`` is 0.
    """
    m = mask.to(torch.float64)
    g, t = m.shape
    lens = m.sum(dim=-1).round().long().unsqueeze(0)  # [1, G]: one "thought" per row
    w_row, _ = aggregation_weights(mode, lens, torch.zeros(1, g, 1, dtype=torch.long),
                                   max_len=t if max_len is None else max_len, dtype=torch.float64)
    return m * w_row[0].unsqueeze(-1)


def masked_clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_agg_mode: str = "token-mean",
    max_len: Optional[int] = None,
    ref_logp: Optional[torch.Tensor] = None,
    **kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``clipped_policy_loss`` on a padded [G, T] batch with a [G, T] mask (plain GRPO layout).

    ``advantages`` may be [G] (one per completion) or [G, T]. Other keyword arguments go to
    ``clipped_policy_loss``.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logp)
    weights = masked_agg_weights(mask, loss_agg_mode, max_len).to(logp.dtype)
    keep = mask.bool()
    return clipped_policy_loss(
        logp[keep],
        old_logp[keep],
        advantages[keep],
        weights[keep],
        ref_logp=None if ref_logp is None else ref_logp[keep],
        **kwargs,
    )
