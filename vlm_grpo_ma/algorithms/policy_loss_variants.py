r"""The 2025-26 policy losses beside the clipped surrogate: CISPO, SAPO, VESPO (registered by name).

All take the arguments of :func:`~vlm_grpo_ma.algorithms.policy_loss.clipped_policy_loss` except the
clip range, plus their own; ``seq_ids`` switches CISPO and SAPO to sequence-level ratios (one
ratio per tree segment, ``sequences.py``). The per-token loss ``l_t`` is summed with the
aggregation weights, ``loss = sum_t w_t l_t`` (+ the KL part), as for the clipped loss. Formulas as
TRL 1.16 implements them (``trl/trainer/grpo_trainer.py``, ``GRPOTrainer._compute_loss``), with
``rho_t`` the token's (or its sequence's) ratio ``pi_theta / pi_old`` and ``sg`` stop-gradient:

``cispo`` (MiniMax-M1, arXiv 2506.13585; the cap as in ScaleRL, arXiv 2510.13786)
    ``l_t = -sg(min(rho_t, cap)) * A_t * log pi_theta(y_t)``: a REINFORCE gradient reweighted by
    the capped importance weight; unlike the PPO clip no token loses its gradient. TRL's
    ``epsilon_high`` is ``cap`` (recommended 5.0).
``sapo`` (Soft Adaptive Policy Optimization, arXiv 2511.20347)
    ``l_t = -(4 / tau_t) * sigmoid(tau_t (rho_t - 1)) * A_t``, ``tau_t = tau_pos`` if ``A_t > 0``
    else ``tau_neg``: a smooth gate instead of the hard clip (gradient ``-4 s(1-s) rho A grad log pi``,
    the plain policy gradient at rho = 1, fading as rho leaves 1).
``vespo`` (Variational Sequence-Level Soft Policy Optimization, arXiv 2602.10693)
    per sequence ``w_i = exp(sum_{t in i} log rho_t)`` (a SUM over the tokens, not GSPO's mean),
    the detached gamma weight ``phi_i = exp(lambda + k log w_i - lambda w_i)`` (``phi(1) = 1``;
    ``k, lambda`` by the sign of the advantage: ``A >= 0`` uses the ``_pos`` pair) and
    ``l_t = -phi_i A_t log pi_theta(y_t)``. It is sequence-level by construction: without
    ``seq_ids`` each token is its own sequence.

On the tree a sequence is a segment (thought, answer; the path when M = 1), ``sequences.py``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .policy_loss import check_loss_inputs, importance_log_ratio, kl_part, ratio_metrics
from .registry import register_policy_loss
from .sequences import segment_sum

__all__ = ["cispo_policy_loss", "sapo_policy_loss", "vespo_policy_loss"]


def _finish(logp, ref_logp, weights, kl_coef, kl_estimator, kl_clamp, per_token, ratio, low, high):
    policy_term = (weights * per_token).sum()
    kl, kl_term = kl_part(logp, ref_logp, weights, kl_coef, kl_estimator, kl_clamp)
    loss = policy_term + kl_term if kl_coef > 0 else policy_term
    return loss, ratio_metrics(ratio.detach(), weights, kl, policy_term, kl_term, low, high)


@register_policy_loss("cispo")
def cispo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
    cap: float = 5.0,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_clamp: Optional[float] = 10.0,
    kl_estimator: str = "k3",
    log_ratio_clamp: float = 20.0,
    seq_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO: ``sum_t w_t * -sg(min(rho_t, cap)) A_t log pi_theta(y_t)`` (+ KL).

    Args: [N] tensors as in ``clipped_policy_loss``; ``cap`` > 0 the largest IS weight;
    ``seq_ids`` [N] for sequence-level ratios. Returns ``(loss, metrics)`` with the keys of
    ``clipped_policy_loss``; ``clip/high`` is the share of trained tokens whose weight the cap
    lowered (any advantage sign), ``clip/low`` is 0.
    """
    if cap <= 0:
        raise ValueError(f"cispo cap must be > 0, got {cap}")
    check_loss_inputs(logp, old_logp, advantages, weights, seq_ids, ref_logp, kl_coef)
    advantages = advantages.detach().to(logp.dtype)
    weights = weights.detach().to(logp.dtype)
    ratio = torch.exp(importance_log_ratio(logp, old_logp, weights, seq_ids, log_ratio_clamp)).detach()
    per_token = -ratio.clamp(max=cap) * advantages * logp
    return _finish(logp, ref_logp, weights, kl_coef, kl_estimator, kl_clamp, per_token, ratio,
                   torch.zeros_like(ratio, dtype=torch.bool), ratio > cap)


@register_policy_loss("sapo")
def sapo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_clamp: Optional[float] = 10.0,
    kl_estimator: str = "k3",
    log_ratio_clamp: float = 20.0,
    seq_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAPO: ``sum_t w_t * -(4 / tau_t) sigmoid(tau_t (rho_t - 1)) A_t`` (+ KL).

    Args: [N] tensors as in ``clipped_policy_loss``; ``tau_pos`` / ``tau_neg`` > 0 the gate
    temperatures of tokens with ``A > 0`` / ``A <= 0`` (TRL's ``sapo_temperature_pos/neg``);
    ``seq_ids`` for sequence-level ratios. Returns ``(loss, metrics)``; there is no hard clip:
    ``clip/low`` and ``clip/high`` count the tokens whose gate has fallen below half of its
    on-policy slope (``4 s (1 - s) < 1/2``, i.e. ``|tau (rho - 1)| > 1.76``), by the side of 1
    their ratio is on.
    """
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"sapo temperatures must be > 0, got {tau_pos}, {tau_neg}")
    check_loss_inputs(logp, old_logp, advantages, weights, seq_ids, ref_logp, kl_coef)
    advantages = advantages.detach().to(logp.dtype)
    weights = weights.detach().to(logp.dtype)
    ratio = torch.exp(importance_log_ratio(logp, old_logp, weights, seq_ids, log_ratio_clamp))
    tau = torch.where(advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    per_token = -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * advantages
    with torch.no_grad():
        z = tau * (ratio.detach() - 1.0)
        faded = 4 * torch.sigmoid(z) * (1 - torch.sigmoid(z)) < 0.5
    return _finish(logp, ref_logp, weights, kl_coef, kl_estimator, kl_clamp, per_token, ratio,
                   faded & (z < 0), faded & (z > 0))


@register_policy_loss("vespo")
def vespo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_clamp: Optional[float] = 10.0,
    kl_estimator: str = "k3",
    log_ratio_clamp: float = 20.0,
    seq_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VESPO: ``sum_t w_t * -phi_i A_t log pi_theta(y_t)`` with the detached gamma weight of the
    token's sequence (module docstring) (+ KL).

    ``log w_i`` is the sum over the sequence's trained tokens of the token log-ratios, each clamped
    to +-``log_ratio_clamp``, then clamped to ``[log 1e-8, 20]`` (TRL's ``get_gamma_weights``).
    ``seq_ids`` None: each token its own sequence. Returns ``(loss, metrics)``; ``ratio/*`` are of
    ``w_i``, ``clip/*`` are 0, and ``vespo/phi_mean`` is the mean of ``phi`` over trained tokens.
    """
    check_loss_inputs(logp, old_logp, advantages, weights, seq_ids, ref_logp, kl_coef)
    advantages = advantages.detach().to(logp.dtype)
    weights = weights.detach().to(logp.dtype)
    with torch.no_grad():
        tok = (logp.detach() - old_logp.detach()).clamp(-log_ratio_clamp, log_ratio_clamp)
        log_w = segment_sum(tok, seq_ids, weights > 0) if seq_ids is not None else tok
        log_w = log_w.clamp(math.log(1e-8), 20.0)
        w = torch.exp(log_w)
        nonneg = advantages >= 0
        k = torch.where(nonneg, torch.full_like(w, k_pos), torch.full_like(w, k_neg))
        lam = torch.where(nonneg, torch.full_like(w, lambda_pos), torch.full_like(w, lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * w).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    per_token = -phi * advantages * logp
    no = torch.zeros_like(w, dtype=torch.bool)
    loss, metrics = _finish(logp, ref_logp, weights, kl_coef, kl_estimator, kl_clamp, per_token, w, no, no)
    trained = weights > 0
    metrics["vespo/phi_mean"] = (phi * trained).sum() / trained.sum().clamp(min=1)
    return loss, metrics
