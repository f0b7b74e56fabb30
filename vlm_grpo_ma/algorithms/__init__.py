"""GRPO-MA algorithms as pure torch functions (no I/O, no DeepSpeed, no models).

- ``grpo_ma``: the whole objective, rewards [B, K, M] to loss, composed from the modules below in
  five documented steps (the trainer calls these and nothing else of the math);
- ``advantages``: GRPO and GRPO-MA (thought / answer) group-relative advantages;
- ``aggregation``: per-token loss weights for ``token-mean``, ``seq-mean-token-mean``,
  ``seq-mean-token-sum``, ``seq-mean-token-sum-norm`` over a K x M tree, each unique token once,
  and the factor that keeps them exact over data-parallel ranks (``cross_rank_scale``);
- ``policy_loss``: the clipped surrogate (separate low / high clip) with an optional KL penalty,
  token- or sequence-level ratios (GSPO);
- ``policy_loss_variants``: CISPO, SAPO and VESPO, registered beside it;
- ``sequences``: what a sequence is on the tree (a segment; the path when M = 1) for sequence ratios;
- ``overlong``: DAPO's overlong filtering per segment and its soft overlong punishment;
- ``kl``: k1 / k2 / k3 KL estimators;
- ``logprob``: chunked selective log-softmax and entropy (no float32 [B, T, V] intermediate);
- ``gss``: the gradient spike score tracker (GSS@10);
- ``registry``: name -> function tables so configs pick estimators and losses by name.
"""

from .advantages import SCALE_REWARDS, grpo_advantages, grpo_ma_advantages, grpo_tree_advantages, standardize_groups, zero_spread_fraction
from .aggregation import AGGREGATION_MODES, aggregation_weights, cross_rank_scale, expand_to_paths, expand_to_tokens
from .gss import GradientSpikeTracker, gradient_spike_scores
from .kl import kl_k1, kl_k2, kl_k3
from .logprob import entropy_from_logits, naive_log_softmax_gather, selective_log_softmax
from .overlong import kept_aggregation_weights, soft_overlong_penalty, tree_overlong_penalty, truncation_keep
from .policy_loss import IMPORTANCE_SAMPLING_LEVELS, clipped_policy_loss, masked_agg_weights, masked_clipped_policy_loss
from .policy_loss_variants import cispo_policy_loss, sapo_policy_loss, vespo_policy_loss
from .sequences import segment_mean, segment_sum, tree_sequence_ids
from .registry import (
    get_adv_est,
    get_kl_estimator,
    get_policy_loss,
    register_adv_est,
    register_kl_estimator,
    register_policy_loss,
)

__all__ = [
    "AGGREGATION_MODES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "SCALE_REWARDS",
    "cispo_policy_loss",
    "sapo_policy_loss",
    "vespo_policy_loss",
    "segment_mean",
    "segment_sum",
    "tree_sequence_ids",
    "soft_overlong_penalty",
    "tree_overlong_penalty",
    "truncation_keep",
    "kept_aggregation_weights",
    "GradientSpikeTracker",
    "aggregation_weights",
    "clipped_policy_loss",
    "cross_rank_scale",
    "entropy_from_logits",
    "expand_to_paths",
    "expand_to_tokens",
    "get_adv_est",
    "get_kl_estimator",
    "get_policy_loss",
    "gradient_spike_scores",
    "grpo_advantages",
    "grpo_ma_advantages",
    "grpo_tree_advantages",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "masked_agg_weights",
    "masked_clipped_policy_loss",
    "naive_log_softmax_gather",
    "register_adv_est",
    "register_kl_estimator",
    "register_policy_loss",
    "selective_log_softmax",
    "standardize_groups",
    "zero_spread_fraction",
]
