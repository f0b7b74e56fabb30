"""The RL objective's configurable parts, between the rewards and the loss (plumbing for ``rl.py``).

Each helper reads the config and calls the pure functions of ``vlm_grpo_ma.algorithms``:

- :func:`overlong_penalty`: DAPO's soft overlong punishment [B, K, M] (``overlong_penalty_cache``);
- :func:`advantages`: the registered estimator with ``scale_rewards`` (``batch`` gathers the
  rewards of every rank first, so the std is the global batch's, as TRL's);
- :func:`loss_lengths`: the segment lengths and keep masks of overlong filtering
  (``mask_truncated_completions``);
- :func:`loss_kwargs`: the policy loss's own options and the sequence ids of sequence-level ratios.
"""

from __future__ import annotations

from typing import Optional

import torch

from vlm_grpo_ma.algorithms import get_adv_est, tree_overlong_penalty, tree_sequence_ids, truncation_keep
from vlm_grpo_ma.rollout.types import TreeRollout
from vlm_grpo_ma.training import distributed as dist
from vlm_grpo_ma.training.config import TrainConfig, effective_scale_rewards, policy_loss_options


def overlong_penalty(cfg: TrainConfig, rollout: TreeRollout) -> Optional[torch.Tensor]:
    """The soft overlong punishment [B, K, M] to add to the rewards, or None when off."""
    rl = cfg.rl
    if rl.overlong_penalty_cache <= 0:
        return None
    return tree_overlong_penalty(rollout.thought_lengths(), rollout.answer_lengths(), rl.max_thought_tokens,
                                 rl.max_answer_tokens, rl.overlong_penalty_cache, rl.overlong_penalty_factor)


def advantages(cfg: TrainConfig, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thought [B, K] and answer [B, K, M] advantages of this rank's rewards [B, K, M].

    With ``scale_rewards: batch`` on several ranks the estimator runs on the rewards of all ranks
    (one ``all_gather_objects``) and this rank's rows are taken back out."""
    rl = cfg.rl
    scale = effective_scale_rewards(rl)
    est = get_adv_est(rl.adv_estimator)
    kw = dict(scale_by_std=scale != "none", eps=rl.adv_eps, scale_rewards=scale)
    if scale != "batch" or dist.world_size() == 1:
        return est(rewards, **kw)
    parts = dist.all_gather_objects(rewards.cpu())
    start = sum(p.shape[0] for p in parts[: dist.rank()])
    ta, aa = est(torch.cat(parts), **kw)
    n = rewards.shape[0]
    return ta[start : start + n], aa[start : start + n]


def loss_lengths(cfg: TrainConfig, rollout: TreeRollout):
    """``(thought_lens [B, K], answer_lens [B, K, M], keep_thought, keep_answer)``: the segment
    lengths and the keep masks of overlong filtering (all True without
    ``mask_truncated_completions``), for ``kept_aggregation_weights``."""
    T, A = rollout.thought_lengths(), rollout.answer_lengths()
    if not cfg.rl.mask_truncated_completions:
        return T, A, torch.ones_like(T, dtype=torch.bool), torch.ones_like(A, dtype=torch.bool)
    keep_t, keep_a = truncation_keep(rollout.thought_truncated, rollout.answer_truncated)
    return T, A, keep_t, keep_a


def loss_kwargs(cfg: TrainConfig, thought_lens: torch.Tensor, answer_lens: torch.Tensor, device=None) -> dict:
    """Keyword arguments of the registered policy loss for one training batch: its own options and,
    at ``importance_sampling_level: sequence`` (and always for ``vespo``, sequence-level by
    construction, as TRL's), the batch's sequence ids (``tree_sequence_ids``)."""
    kw = policy_loss_options(cfg.rl)
    if cfg.rl.importance_sampling_level == "sequence" or cfg.rl.policy_loss == "vespo":  # VESPO: by construction
        kw["seq_ids"] = tree_sequence_ids(thought_lens.cpu(), answer_lens.cpu()).to(device)
    return kw
