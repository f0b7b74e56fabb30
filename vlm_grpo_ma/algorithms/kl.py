r"""Per-token estimators of KL(pi_theta || pi_ref) from tokens sampled from pi_theta (Schulman 2020).

With ``log r = log pi_ref(y) - log pi_theta(y)`` at a sampled token y::

    k1 = -log r                    unbiased, high variance, can be negative
    k2 = (log r)^2 / 2             biased, low variance, >= 0
    k3 = (r - 1) - log r           unbiased, low variance, >= 0   (GRPO's choice)

``log r`` is clamped to ``[-clamp, clamp]`` before use (before the exp of k3), so one token where
the policies disagree wildly cannot overflow the loss; ``clamp=None`` disables it.
Reference: J. Schulman, "Approximating KL Divergence", 2020.
"""

from __future__ import annotations

from typing import Optional

import torch

from .registry import register_kl_estimator

__all__ = ["kl_k1", "kl_k2", "kl_k3"]


def _log_ratio(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: Optional[float]) -> torch.Tensor:
    log_r = ref_logp - logp
    if clamp is not None:
        log_r = log_r.clamp(min=-clamp, max=clamp)
    return log_r


@register_kl_estimator("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor, *, clamp: Optional[float] = 10.0) -> torch.Tensor:
    """k1 = log pi_theta - log pi_ref, elementwise; logp, ref_logp [...] -> [...]."""
    return -_log_ratio(logp, ref_logp, clamp)


@register_kl_estimator("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor, *, clamp: Optional[float] = 10.0) -> torch.Tensor:
    """k2 = (log pi_ref - log pi_theta)^2 / 2, elementwise; [...] -> [...]."""
    return 0.5 * _log_ratio(logp, ref_logp, clamp).square()


@register_kl_estimator("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, *, clamp: Optional[float] = 10.0) -> torch.Tensor:
    """k3 = exp(log r) - 1 - log r with log r = log pi_ref - log pi_theta, elementwise; [...] -> [...]."""
    log_r = _log_ratio(logp, ref_logp, clamp)
    return torch.expm1(log_r) - log_r
