r"""Group-relative advantages: GRPO over G samples, GRPO-MA over a tree of K thoughts x M answers.

GRPO (one group of G completions per prompt, rewards ``r_i``)::

    A_i = (r_i - mean_j r_j) / (std_j r_j + eps)

GRPO-MA (per prompt K thoughts ``t_k``, each with M answers ``a_km``, rewards ``r_km``)::

    V_k    = mean_m r_km                                              thought value
    A^T_k  = (V_k  - mean_j V_j)      / (std_j V_j      + eps)        over the K thoughts
    A^A_km = (r_km - mean_{j,n} r_jn) / (std_{j,n} r_jn + eps)        over all K*M answers

Conventions (keyword arguments of these functions; the trainer exposes ``scale_adv_by_std``,
``scale_rewards`` and ``adv_eps``, not ``unbiased``):

* ``std`` is the population standard deviation (``unbiased=False``); ``unbiased=True`` uses the
  N-1 denominator (what ``torch.std`` does by default, and what verl's GRPO uses);
* ``scale_by_std=False`` drops the division (Dr.GRPO), leaving the centred values;
* ``scale_rewards`` (TRL's names) chooses the std: ``"group"`` (default) each group's own,
  ``"batch"`` one std over every value of the batch (all B groups; centring stays per group:
  TRL's ``scale_rewards="batch"``, after Understanding R1-Zero / "tricks or traps" batch
  normalisation), ``"none"`` no division (the same as ``scale_by_std=False``). For a tree, the
  thought advantage uses the std of all B*K thought values, the answer advantage that of all
  B*K*M rewards;
* a group whose values are all equal gets advantage exactly 0 (not merely ~1e-9), including a
  group of one value;
* with M = 1 both GRPO-MA advantages equal the GRPO advantage of the K rewards, bit for bit
  (the same code path computes them).

Shapes: a leading batch dimension B (prompts) is optional everywhere; ``[K, M]`` is treated as
``[1, K, M]`` and the output keeps the input's rank.
"""

from __future__ import annotations

import torch

from .registry import register_adv_est

SCALE_REWARDS = ("group", "batch", "none")

__all__ = [
    "SCALE_REWARDS",
    "standardize_groups",
    "grpo_advantages",
    "grpo_ma_advantages",
    "grpo_tree_advantages",
    "zero_spread_fraction",
]


def standardize_groups(
    values: torch.Tensor,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    unbiased: bool = False,
    scale_rewards: str = "group",
) -> torch.Tensor:
    """Standardise each row of ``values`` [B, N] over its N entries.

    Returns ``(x - mean) / (std + eps)`` (or ``x - mean`` without std scaling), [B, N], in the
    input's floating dtype (integers and bools are promoted to float32). The mean is the row's;
    the std the row's (``scale_rewards="group"``) or that of all B*N entries (``"batch"``);
    ``"none"`` does not divide. A row whose entries are all equal returns exactly 0.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if values.dim() != 2:
        raise ValueError(f"standardize_groups expects [B, N], got shape {tuple(values.shape)}")
    x = values if values.is_floating_point() else values.float()
    centred = x - x.mean(dim=-1, keepdim=True)
    if scale_by_std and scale_rewards != "none":
        pool = x.reshape(1, -1) if scale_rewards == "batch" else x
        n = pool.shape[-1]
        std = pool.std(dim=-1, keepdim=True, correction=1 if (unbiased and n > 1) else 0)
        centred = centred / (std + eps)
    constant = (x.amax(dim=-1, keepdim=True) == x.amin(dim=-1, keepdim=True))
    return torch.where(constant, torch.zeros_like(centred), centred)


def grpo_advantages(
    rewards: torch.Tensor,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    unbiased: bool = False,
    scale_rewards: str = "group",
) -> torch.Tensor:
    """GRPO advantages of a group of completions per prompt.

    Args:
        rewards: [B, G] (or [G] for a single prompt), one scalar reward per completion.
        scale_by_std: divide by the group's std (False = Dr.GRPO).
        eps: added to the std before dividing.
        unbiased: N-1 denominator in the std instead of the population std.
        scale_rewards: ``group`` / ``batch`` / ``none``: whose std divides (module docstring).

    Returns:
        advantages with the shape of ``rewards``: [B, G] (or [G]).
    """
    if rewards.dim() not in (1, 2):
        raise ValueError(f"grpo_advantages expects [B, G] or [G], got shape {tuple(rewards.shape)}")
    single = rewards.dim() == 1
    r = rewards.unsqueeze(0) if single else rewards
    adv = standardize_groups(r, scale_by_std=scale_by_std, eps=eps, unbiased=unbiased, scale_rewards=scale_rewards)
    return adv.squeeze(0) if single else adv


@register_adv_est("grpo_ma")
def grpo_ma_advantages(
    rewards: torch.Tensor,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    unbiased: bool = False,
    scale_rewards: str = "group",
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO-MA thought and answer advantages of a tree of K thoughts x M answers per prompt.

    Args:
        rewards: [B, K, M] (or [K, M] for a single prompt); ``rewards[b, k, m]`` is the reward of
            answer m of thought k of prompt b.
        scale_by_std, eps, unbiased, scale_rewards: as in :func:`grpo_advantages` (``batch``: the
            thought std over all B*K thought values, the answer std over all B*K*M rewards).

    Returns:
        ``(thought_adv, answer_adv)``:
        thought_adv [B, K] (or [K]): the thought values ``V_k = mean_m r_km`` standardised over
        each prompt's K thoughts;
        answer_adv [B, K, M] (or [K, M]): the rewards standardised over each prompt's K*M answers.
    """
    if rewards.dim() not in (2, 3):
        raise ValueError(f"grpo_ma_advantages expects [B, K, M] or [K, M], got shape {tuple(rewards.shape)}")
    single = rewards.dim() == 2
    r = rewards.unsqueeze(0) if single else rewards
    r = r if r.is_floating_point() else r.float()
    b, k, m = r.shape
    kw = dict(scale_by_std=scale_by_std, eps=eps, unbiased=unbiased, scale_rewards=scale_rewards)
    thought_values = r.mean(dim=-1)  # [B, K]
    thought_adv = standardize_groups(thought_values, **kw)  # [B, K]
    answer_adv = standardize_groups(r.reshape(b, k * m), **kw).reshape(b, k, m)  # [B, K, M]
    if single:
        return thought_adv.squeeze(0), answer_adv.squeeze(0)
    return thought_adv, answer_adv


@register_adv_est("grpo")
def grpo_tree_advantages(
    rewards: torch.Tensor,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    unbiased: bool = False,
    scale_rewards: str = "group",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain GRPO in the tree interface: rewards [B, K, 1] (TkA1) -> (thought_adv [B, K], answer_adv [B, K, 1]).

    Each (thought, answer) pair is one GRPO completion, so thought and answer tokens get the same
    advantage. Raises ValueError for M > 1 (use ``grpo_ma`` for a real tree).
    """
    if rewards.shape[-1] != 1:
        raise ValueError(
            f"the 'grpo' estimator needs one answer per thought (M = 1), got rewards of shape "
            f"{tuple(rewards.shape)}; use 'grpo_ma' for M > 1"
        )
    adv = grpo_advantages(rewards[..., 0], scale_by_std=scale_by_std, eps=eps, unbiased=unbiased,
                          scale_rewards=scale_rewards)
    return adv, adv.unsqueeze(-1)


def zero_spread_fraction(rewards: torch.Tensor) -> float:
    """Share of prompts whose rewards are all equal (their advantages are all 0, they teach nothing).

    Args:
        rewards: [B, ...]: one group per prompt, flattened over every dimension after the first
            ([B, G] for GRPO, [B, K, M] for a tree: all K*M rewards); a 1-D tensor is one group.
            For the thought level of a tree pass ``rewards.mean(-1)`` (thought values).

    Returns:
        a float in [0, 1] (0.0 for an empty batch). Logged as ``adv/zero_spread``.
    """
    if rewards.dim() >= 1 and rewards.shape[0] == 0:
        return 0.0
    r = rewards.reshape(1, -1) if rewards.dim() <= 1 else rewards.reshape(rewards.shape[0], -1)
    if r.shape[1] == 0:
        return 1.0
    constant = r.amax(dim=-1) == r.amin(dim=-1)
    return constant.float().mean().item()
