r"""The whole GRPO-MA objective, from a tree's rewards to its loss, in pure functions.

A tree: B prompts, K thoughts per prompt, M answers per thought; reward ``r_bkm`` per (thought,
answer) pair; thought k has ``T_bk`` trained tokens, answer m ``A_bkm``. The trained tokens are
laid out flat, N = sum T + sum A, in the canonical order (``aggregation.expand_to_tokens``)::

    for b: for k: [T_bk thought tokens], [A_bk0 answer tokens], ..., [A_bk(M-1) answer tokens]

Five steps, in the order the trainer runs them (``training/rl.py`` fetches the tensors: it
samples, scores, gathers across ranks and runs the model, and calls these):

1. :func:`tree_advantages` (once per step): DAPO's soft overlong punishment added to the rewards
   (``overlong_cache > 0``), then the registered estimator (``adv_estimator``): thought
   advantages ``A^T`` [B, K] from the thought values ``V_bk = mean_m r_bkm``, answer advantages
   ``A^A`` [B, K, M] from the rewards (``advantages.py``); ``scale_rewards`` picks whose std
   divides them (with ``batch`` the caller passes the rewards of every rank);
2. :func:`trained_tokens` and :func:`segment_weights` (once per step): the loss weight of each
   token of each segment under ``loss_agg_mode`` (``aggregation.py``), segments cut by overlong
   filtering (``mask_truncated``, ``overlong.py``) weighing 0, times the data-parallel factor
   (``cross_rank_scale``: ``global_tokens`` is the all-ranks sum of :func:`trained_tokens`);
3. :func:`token_terms` (once per micro-batch): which token takes which value: every thought token
   the thought's advantage and weight, every answer token its answer's, in canonical order; the
   truncated importance weights ``min(pi_old / pi_sampler, tis_cap)`` multiplied into the weights
   (TIS, ``tis.py``); the sequence ids of sequence-level ratios (GSPO, ``sequences.py``);
4. :func:`old_logp_for_loss`: the old log-probs of the ratio are the TRAINER's: its own scores
   before the update when they are needed (:attr:`ObjectiveSettings.needs_old_logp`: several
   epochs, or TIS), else the current ones detached (ratio 1: the exact on-policy gradient). The
   sampler's log-probs are never the old log-probs: they differ when another engine (vLLM) sampled,
   and are used by TIS only;
5. :func:`policy_loss` (per micro-batch and epoch): the registered policy loss (``policy_loss``:
   clipped, cispo, sapo, vespo) with its options, the KL penalty to the reference
   (``kl_coef``, ``kl_estimator``), on the token terms: ``loss = sum_t w_t l_t``.

:func:`grpo_ma_objective` composes the five for one tree on one rank in one micro-batch: the
whole objective in one call, checked by hand in ``tests/test_grpo_ma.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from .aggregation import AGGREGATION_MODES, cross_rank_scale, expand_to_tokens
from .overlong import kept_aggregation_weights, tree_overlong_penalty, truncation_keep
from .registry import get_adv_est, get_policy_loss
from .sequences import tree_sequence_ids
from .tis import tis_metrics, tis_weights

__all__ = [
    "ObjectiveSettings",
    "TreeAdvantages",
    "TokenTerms",
    "overlong_penalty",
    "tree_advantages",
    "trained_tokens",
    "segment_weights",
    "token_terms",
    "old_logp_for_loss",
    "policy_loss",
    "grpo_ma_objective",
]


@dataclass(frozen=True)
class ObjectiveSettings:
    """Every setting of the objective (the trainer builds it from its config: ``training.config``)."""

    adv_estimator: str = "grpo_ma"  #: registered estimator: grpo_ma, or grpo (M = 1)
    scale_rewards: str = "group"  #: whose std divides the advantages: group, batch, none
    adv_eps: float = 1e-6  #: added to that std
    overlong_cache: int = 0  #: DAPO soft overlong punishment's L_cache (0: off)
    overlong_factor: float = 1.0  #: its scale
    max_thought_tokens: int = 0  #: the thought budget (the punishment's and Dr.GRPO's L_max)
    max_answer_tokens: int = 0  #: the answer budget
    mask_truncated: bool = False  #: DAPO overlong filtering per segment
    loss_agg_mode: str = "token-mean"  #: one of AGGREGATION_MODES
    policy_loss: str = "clipped"  #: registered policy loss
    loss_options: dict = field(default_factory=dict)  #: its own keywords (clip_low / clip_high, cap, ...)
    importance_sampling_level: str = "token"  #: token, or sequence (GSPO)
    kl_coef: float = 0.0  #: beta of the KL penalty (needs a reference)
    kl_estimator: str = "k3"  #: k1, k2, k3
    tis_cap: float = 0.0  #: truncated importance sampling cap C (0: off)
    ppo_epochs: int = 1  #: updates per rollout batch

    def __post_init__(self):
        if self.loss_agg_mode not in AGGREGATION_MODES:
            raise ValueError(f"unknown loss_agg_mode {self.loss_agg_mode!r}; choose one of {AGGREGATION_MODES}")

    @property
    def sequence_level(self) -> bool:
        """One ratio per sequence (GSPO; VESPO is sequence-level by construction, as TRL's)."""
        return self.importance_sampling_level == "sequence" or self.policy_loss == "vespo"

    @property
    def needs_old_logp(self) -> bool:
        """Whether the trainer must score the rollout before the update (step 4)."""
        return self.ppo_epochs > 1 or self.tis_cap > 0

    @property
    def max_len(self) -> int:
        """Dr.GRPO's constant L_max: the longest path the budgets allow."""
        return self.max_thought_tokens + self.max_answer_tokens


class TreeAdvantages(NamedTuple):
    """Step 1's output."""

    thought: torch.Tensor  #: [B, K] A^T
    answer: torch.Tensor  #: [B, K, M] A^A
    penalty: Optional[torch.Tensor]  #: [B, K, M] the soft overlong punishment added to the rewards, or None


class TokenTerms(NamedTuple):
    """Step 3's output: the per-token values of one micro-batch, canonical order."""

    advantages: torch.Tensor  #: [N] float32
    weights: torch.Tensor  #: [N] float32 (aggregation x cross-rank x TIS)
    seq_ids: Optional[torch.Tensor]  #: [N] long, sequence-level ratios only
    tis: dict  #: ``tis/mean``, ``tis/capped`` over the N tokens (empty without TIS)


def overlong_penalty(s: ObjectiveSettings, thought_lens: torch.Tensor, answer_lens: torch.Tensor) -> Optional[torch.Tensor]:
    """The soft overlong punishment [B, K, M] to add to the rewards, or None when off.

    Args: thought_lens [B, K], answer_lens [B, K, M] (generated tokens, ``</think>`` included)."""
    if s.overlong_cache <= 0:
        return None
    return tree_overlong_penalty(thought_lens, answer_lens, s.max_thought_tokens, s.max_answer_tokens,
                                 s.overlong_cache, s.overlong_factor)


def tree_advantages(s: ObjectiveSettings, rewards: torch.Tensor, thought_lens: torch.Tensor,
                    answer_lens: torch.Tensor) -> TreeAdvantages:
    """Step 1: thought [B, K] and answer [B, K, M] advantages of the rewards [B, K, M].

    ``thought_lens`` [B, K], ``answer_lens`` [B, K, M] serve the overlong punishment only. With
    ``scale_rewards: batch`` the std is the batch's: pass every rank's rows (and take yours back)."""
    penalty = overlong_penalty(s, thought_lens, answer_lens)
    est = get_adv_est(s.adv_estimator)
    ta, aa = est(rewards if penalty is None else rewards + penalty, scale_by_std=s.scale_rewards != "none",
                 eps=s.adv_eps, scale_rewards=s.scale_rewards)
    return TreeAdvantages(ta, aa, penalty)


def _kept(s: ObjectiveSettings, thought_truncated: torch.Tensor, answer_truncated: torch.Tensor):
    """Keep masks [B, K] / [B, K, M] of overlong filtering (all True when off)."""
    if not s.mask_truncated:
        return (torch.ones_like(thought_truncated, dtype=torch.bool),
                torch.ones_like(answer_truncated, dtype=torch.bool))
    return truncation_keep(thought_truncated, answer_truncated)


def trained_tokens(s: ObjectiveSettings, thought_lens: torch.Tensor, answer_lens: torch.Tensor,
                   thought_truncated: torch.Tensor, answer_truncated: torch.Tensor) -> float:
    """The number of tokens that stay in the loss (each thought once; filtered segments out).

    Args: lengths [B, K] / [B, K, M] and truncation flags of the same shapes."""
    return _count(thought_lens, answer_lens, *_kept(s, thought_truncated, answer_truncated))


def _count(thought_lens, answer_lens, keep_thought, keep_answer) -> float:
    return float((thought_lens * keep_thought).sum() + (answer_lens * keep_answer).sum())


def segment_weights(s: ObjectiveSettings, thought_lens: torch.Tensor, answer_lens: torch.Tensor,
                    thought_truncated: torch.Tensor, answer_truncated: torch.Tensor, *,
                    global_tokens: Optional[float] = None, world_size: int = 1,
                    grad_accum: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: the loss weight of each token of each segment, ``(w_thought [B, K], w_answer [B, K, M])``.

    The weights of ``loss_agg_mode`` over this rank's whole batch (filtered segments weigh 0 and
    count 0 tokens), times ``cross_rank_scale`` so that DeepSpeed's mean over ``grad_accum``
    micro-batches and ``world_size`` ranks gives the aggregation of the global batch.
    ``global_tokens``: the sum of :func:`trained_tokens` over the ranks (``token-mean`` only;
    default this rank's, i.e. one rank)."""
    keep_t, keep_a = _kept(s, thought_truncated, answer_truncated)
    w_t, w_a = kept_aggregation_weights(s.loss_agg_mode, thought_lens, answer_lens, keep_t, keep_a, max_len=s.max_len)
    local = _count(thought_lens, answer_lens, keep_t, keep_a)
    scale = cross_rank_scale(s.loss_agg_mode, local, local if global_tokens is None else global_tokens,
                             world_size, grad_accum)
    return w_t * scale, w_a * scale


def token_terms(s: ObjectiveSettings, thought_adv: torch.Tensor, answer_adv: torch.Tensor,
                thought_weights: torch.Tensor, answer_weights: torch.Tensor, thought_lens: torch.Tensor,
                answer_lens: torch.Tensor, *, trainer_old_logp: Optional[torch.Tensor] = None,
                rollout_logp: Optional[torch.Tensor] = None, device=None) -> TokenTerms:
    """Step 3: the per-token advantages, weights and sequence ids of one micro-batch.

    Args:
        thought_adv [B, K], answer_adv [B, K, M]: step 1's rows of these prompts;
        thought_weights [B, K], answer_weights [B, K, M]: step 2's rows;
        thought_lens [B, K], answer_lens [B, K, M]: their segment lengths;
        trainer_old_logp [N], rollout_logp [N]: the trainer's scores before the update and the
            sampler's log-probs (NaN where it did not sample), both needed with ``tis_cap > 0``;
        device: where the [N] tensors go (default: ``trainer_old_logp``'s device, else the CPU).
    Returns:
        :class:`TokenTerms`.
    """
    for name, t, a in (("adv", thought_adv, answer_adv), ("weights", thought_weights, answer_weights)):
        if t.shape != thought_lens.shape or a.shape != answer_lens.shape:
            raise ValueError(f"thought_{name} {tuple(t.shape)} and answer_{name} {tuple(a.shape)} must have the shapes "
                             f"of thought_lens {tuple(thought_lens.shape)} and answer_lens {tuple(answer_lens.shape)}")
    adv = expand_to_tokens(thought_adv.float(), answer_adv.float(), thought_lens, answer_lens)
    w = expand_to_tokens(thought_weights.float(), answer_weights.float(), thought_lens, answer_lens)
    if device is None:
        device = trainer_old_logp.device if trainer_old_logp is not None else adv.device
    adv, w = adv.to(device), w.to(device)
    tis: dict = {}
    if s.tis_cap > 0:
        if trainer_old_logp is None or rollout_logp is None:
            raise ValueError("tis_cap > 0 needs trainer_old_logp and rollout_logp")
        iw = tis_weights(trainer_old_logp, rollout_logp, s.tis_cap).to(device)
        w = w * iw
        tis = tis_metrics(iw, s.tis_cap)
    seq_ids = tree_sequence_ids(thought_lens.cpu(), answer_lens.cpu()).to(device) if s.sequence_level else None
    return TokenTerms(adv, w, seq_ids, tis)


def old_logp_for_loss(logp: torch.Tensor, trainer_old_logp: Optional[torch.Tensor]) -> torch.Tensor:
    """Step 4: the old log-probs [N] of the ratio: the trainer's own scores before the update
    when it computed them, else the current ``logp`` detached (ratio 1, the on-policy gradient)."""
    return logp.detach() if trainer_old_logp is None else trainer_old_logp


def policy_loss(s: ObjectiveSettings, logp: torch.Tensor, terms: TokenTerms, *,
                trainer_old_logp: Optional[torch.Tensor] = None,
                ref_logp: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step 5: the registered policy loss of one micro-batch.

    Args:
        logp: [N] the current policy's log-probs (with gradient);
        terms: step 3's :class:`TokenTerms`;
        trainer_old_logp: [N] the trainer's scores before the update, or None (step 4);
        ref_logp: [N] the reference policy's log-probs (``kl_coef > 0``).
    Returns:
        ``(loss, metrics)`` as the registered loss returns them (``policy_loss.clipped_policy_loss``).
    """
    return get_policy_loss(s.policy_loss)(
        logp, old_logp_for_loss(logp, trainer_old_logp), terms.advantages, terms.weights, ref_logp=ref_logp,
        kl_coef=s.kl_coef, kl_estimator=s.kl_estimator, seq_ids=terms.seq_ids, **s.loss_options,
    )


def grpo_ma_objective(s: ObjectiveSettings, rewards: torch.Tensor, thought_lens: torch.Tensor,
                      answer_lens: torch.Tensor, logp: torch.Tensor, *,
                      thought_truncated: Optional[torch.Tensor] = None,
                      answer_truncated: Optional[torch.Tensor] = None,
                      trainer_old_logp: Optional[torch.Tensor] = None,
                      rollout_logp: Optional[torch.Tensor] = None,
                      ref_logp: Optional[torch.Tensor] = None,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor], TreeAdvantages, TokenTerms]:
    """Steps 1-5 on one tree, one rank, one micro-batch: the objective in one call.

    Args:
        rewards [B, K, M]; thought_lens [B, K], answer_lens [B, K, M]; logp [N] (canonical order,
        with gradient); truncation flags [B, K] / [B, K, M] (default none truncated);
        trainer_old_logp, rollout_logp, ref_logp: [N] or None (steps 3-5).
    Returns:
        ``(loss, metrics, advantages, token terms)``.
    """
    t_trunc = torch.zeros_like(thought_lens, dtype=torch.bool) if thought_truncated is None else thought_truncated
    a_trunc = torch.zeros_like(answer_lens, dtype=torch.bool) if answer_truncated is None else answer_truncated
    adv = tree_advantages(s, rewards, thought_lens, answer_lens)
    w_t, w_a = segment_weights(s, thought_lens, answer_lens, t_trunc, a_trunc)
    terms = token_terms(s, adv.thought, adv.answer, w_t, w_a, thought_lens, answer_lens,
                        trainer_old_logp=trainer_old_logp, rollout_logp=rollout_logp)
    loss, metrics = policy_loss(s, logp, terms, trainer_old_logp=trainer_old_logp, ref_logp=ref_logp)
    return loss, metrics, adv, terms
