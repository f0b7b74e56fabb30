"""Truncated importance sampling (TIS): correcting for a rollout engine that is not the trainer.

A rollout engine such as vLLM samples from pi_rollout, which differs from the trainer's pi_old
even with identical weights (other kernels, bf16 round-off, fused sampling).  The trainer
recomputes the old log-probs itself; the policy-gradient tokens were still *drawn* from
pi_rollout, so each token's loss is reweighted by the importance ratio pi_old / pi_rollout,
truncated at ``cap`` to bound its variance (Yao et al., 2025, "Your efficient RL framework
secretly brings you off-policy RL training"; verl's ``tis_imp_ratio_cap``):

    w_t = min(exp(log pi_old(y_t) - log pi_rollout(y_t)), cap)        (no gradient through w)

and the token loss becomes ``w_t * loss_t``.  A token the engine did not sample (the ``</think>``
appended to a thought that hit its length limit: rollout log-prob NaN) gets w = 1.
"""

from __future__ import annotations

import torch

__all__ = ["tis_weights", "tis_metrics"]


def tis_weights(trainer_old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """Truncated importance weights.

    Args:
        trainer_old_logp: [...] log pi_old of each token, recomputed by the trainer.
        rollout_logp: [...] (same shape) the rollout engine's sampling log-probs; NaN (or any
            non-finite value) marks a token the engine did not sample.
        cap: truncation C > 0 (weights above it are set to C).
    Returns:
        [...] float32 weights ``min(exp(old - rollout), cap)``, detached; 1 where ``rollout_logp``
        is not finite.
    """
    if cap <= 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    if trainer_old_logp.shape != rollout_logp.shape:
        raise ValueError(f"shape mismatch: trainer {tuple(trainer_old_logp.shape)} vs rollout {tuple(rollout_logp.shape)}")
    old = trainer_old_logp.detach().float()
    roll = rollout_logp.detach().float().to(old.device)
    sampled = torch.isfinite(roll)
    log_ratio = torch.where(sampled, old - roll, torch.zeros_like(old))
    # clamp the log-ratio first so exp never overflows; min(exp(x), C) = exp(min(x, log C))
    w = torch.exp(torch.clamp(log_ratio, max=float(torch.log(torch.tensor(float(cap))))))
    return torch.where(sampled, w, torch.ones_like(w))


def tis_metrics(weights: torch.Tensor, cap: float, mask: torch.Tensor | None = None) -> dict[str, float]:
    """``tis/mean`` and ``tis/capped`` (share of tokens at the cap) over ``mask`` (all if None)."""
    w = weights.float()
    if mask is not None:
        w = w[mask.bool()]
    if w.numel() == 0:
        return {"tis/mean": 1.0, "tis/capped": 0.0}
    return {"tis/mean": float(w.mean()), "tis/capped": float((w >= cap * (1 - 1e-6)).float().mean())}
