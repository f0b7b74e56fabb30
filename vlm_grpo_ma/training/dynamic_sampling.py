r"""Dynamic sampling: train only on prompts whose rewards have spread (DAPO, arXiv 2503.14476, 3.2).

A prompt whose K*M rewards are all equal has every advantage 0: it costs its generation and
teaches nothing (``rollout/zero_spread_frac``). ``dynamic_sampling`` (config) chooses:

``off``
    train on the step's prompts as sampled.
``full`` (DAPO)
    sample the whole tree of the step's prompts, score it, drop the prompts without spread, and
    refill from fresh prompts (``more(round)``), round after round, until this rank holds its
    share of the batch or ``dynamic_sampling_max_rounds`` extra rounds were spent. A refill round
    draws about what the shortfall needs at the keep rate seen so far, plus one (at most a batch).
``pilot`` (GRPO-MA only: no single-sample trainer can do it)
    sample the K thoughts and ONE answer each, score those K pilot pairs, drop a prompt whose K
    pilot rewards are all equal BEFORE generating its other M-1 answers per thought, then
    complete the kept trees (``extend``). A kept prompt has spread by construction (its pilot
    rewards differ); a dropped one might have had spread among the answers not generated (a
    false drop: ``benchmarks/dynamic_sampling.py`` measures how often, against the time saved).
    Refill rounds as in ``full``.

The spread test uses the rewards the advantages use (the task's reward plus any soft overlong
punishment). After the rounds every rank trains on the same number of prompts (the smallest over
the ranks, at most its share of the batch), so the path aggregations stay exact across ranks;
if no rank found any prompt with spread, the first round's prompts are trained as they are
(their advantages are 0) and ``dynamic/fallback`` is 1.

The loop is written over callables (generation, scoring, the collectives) so that it is tested
without a model; :func:`vlm_grpo_ma.training.rl.rollout_and_score` passes the real ones. With
several ranks the callables ``any_rank`` and ``min_rank`` are collectives and every rank calls
them, and ``generate`` / ``extend`` (ZeRO-3 gathers inside), the same number of times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
from collections import Counter
from typing import Callable, Optional, Sequence

import torch

from vlm_grpo_ma.rollout.types import SamplingParams, TreeRollout, append_answers, cat_prompts
from vlm_grpo_ma.training.config import DYNAMIC_SAMPLING  # the mode names live with the config

__all__ = ["DYNAMIC_SAMPLING", "Collected", "has_spread", "collect"]


def has_spread(rewards: torch.Tensor) -> torch.Tensor:
    """[B] bool: the prompts whose rewards (``[B, ...]``, every entry after the first dimension
    one group) are not all equal."""
    r = rewards.reshape(rewards.shape[0], -1)
    return r.amax(dim=1) != r.amin(dim=1)


@dataclass
class Collected:
    """What the rounds produced: the trees to train on, their samples and their scored pairs."""

    rollout: TreeRollout
    samples: list
    scored: list  #: the Reward of every pair, flat order (b * K + k) * M + m
    stats: dict[str, float] = field(default_factory=dict)


def _select(tree: TreeRollout, idx: Sequence[int]) -> TreeRollout:
    """Prompts ``idx`` of ``tree``, without the whole rollout's counters."""
    return tree.select(idx, keep_stats=False)


def _rewards(scored: Sequence, B: int, K: int, M: int, penalty: Optional[torch.Tensor]) -> torch.Tensor:
    r = torch.tensor([float(x.total) for x in scored], dtype=torch.float32).reshape(B, K, M)
    return r if penalty is None else r + penalty


def collect(
    mode: str,
    samples: Sequence,
    *,
    K: int,
    M: int,
    target: int,
    max_rounds: int,
    generate: Callable[[Sequence, int], TreeRollout],
    extend: Callable[[TreeRollout, int], TreeRollout],
    score: Callable[[TreeRollout, Sequence], list],
    penalty: Callable[[TreeRollout], Optional[torch.Tensor]] = lambda tree: None,
    more: Callable[[int], Sequence],
    any_rank: Callable[[bool], bool] = lambda flag: flag,
    min_rank: Callable[[int], int] = lambda n: n,
    on_drop: Optional[Callable[[TreeRollout, list, list], None]] = None,
    generate_pilot: Optional[Callable] = None,
) -> Collected:
    """Run the rounds of ``full`` or ``pilot`` dynamic sampling on this rank.

    Args:
        mode: ``full`` or ``pilot``.
        samples: this rank's prompts of the step (round 0).
        K, M: thoughts per prompt, answers per thought.
        target: prompts this rank trains on at most (its share of the batch).
        max_rounds: extra generation rounds allowed after round 0.
        generate: ``(samples, m) -> tree`` with K thoughts x m answers.
        extend: ``(tree, m) -> tree`` of m NEW answers for each thought of ``tree`` (pilot).
        score: ``(tree, samples) -> [Reward]`` of every pair, flat order.
        penalty: ``tree -> [B, K, m]`` added to the rewards before the spread test, or None.
        more: ``round -> samples``: fresh prompts for extra round 1, 2, ...
        any_rank, min_rank: the collectives (identity on one rank).
        on_drop: pilot only, called with ``(pilot tree, samples, pilot Rewards)`` of the prompts a
            round drops (the benchmark completes them to count false drops).
        generate_pilot: pilot only, ``(samples, decide) -> (pilot tree, new-answers tree or None)``
            doing both halves in one pass (``HFRolloutBackend.generate_tree_pilot``: the kept
            thoughts continue their cache); without it, ``generate(samples, 1)`` then ``extend``.

    Returns:
        :class:`Collected`; ``stats``: ``dynamic/rounds`` (generation rounds run),
        ``dynamic/prompts_sampled``, ``dynamic/prompts_kept`` (with spread, before trimming),
        ``dynamic/prompts_trained``, ``dynamic/fallback``, and for the pilot
        ``dynamic/pilot_dropped`` (prompts dropped after their pilot answers).
    """
    if mode not in ("full", "pilot"):
        raise ValueError(f"collect runs dynamic_sampling full or pilot, got {mode!r}")
    rounds = _Rounds(K=K, M=M, generate=generate, extend=extend, score=score, penalty=penalty, any_rank=any_rank,
                     on_drop=on_drop, generate_pilot=generate_pilot)
    play = rounds.full_round if mode == "full" else rounds.pilot_round
    first: Optional[tuple] = None
    rnd = 0
    while True:
        samples = list(samples)
        rounds.stats["dynamic/rounds"] += 1
        rounds.stats["dynamic/prompts_sampled"] += len(samples)
        played = play(samples)
        if first is None:
            first = played
        short = len(rounds.kept_samples) < target
        if rnd >= max_rounds or not any_rank(short):
            break
        rnd += 1
        samples = list(more(rnd))[: rounds.refill_size(target)]
    rounds.stats["dynamic/prompts_kept"] = float(len(rounds.kept_samples))
    n = min_rank(min(len(rounds.kept_samples), target))
    rounds.stats["dynamic/fallback"] = float(n == 0)
    if n == 0:  # no rank found a prompt with spread: train round 0 as it is (advantages 0)
        return rounds.as_sampled(*first, complete=mode == "pilot" and M > 1)
    return rounds.kept(n)


@dataclass
class _Rounds:
    """One :func:`collect` call: the tree shape (K thoughts x M answers), the callables, and what
    the rounds produced so far: the kept prompts' trees, samples and scored pairs (flat order
    ``(b * K + k) * M + m``), the stats and the generation work of every call (dropped prompts
    included)."""

    K: int
    M: int
    generate: Callable[[Sequence, int], TreeRollout]
    extend: Callable[[TreeRollout, int], TreeRollout]
    score: Callable[[TreeRollout, Sequence], list]
    penalty: Callable[[TreeRollout], Optional[torch.Tensor]]
    any_rank: Callable[[bool], bool]
    on_drop: Optional[Callable[[TreeRollout, list, list], None]]
    generate_pilot: Optional[Callable]
    kept_trees: list = field(default_factory=list)
    kept_samples: list = field(default_factory=list)
    kept_scored: list = field(default_factory=list)
    stats: dict = field(default_factory=lambda: {"dynamic/rounds": 0.0, "dynamic/prompts_sampled": 0.0,
                                                 "dynamic/pilot_dropped": 0.0})
    work: Counter = field(default_factory=Counter)

    def count(self, tree: TreeRollout) -> TreeRollout:
        """``tree``, its generation counters added to the work."""
        self.work.update(tree.stats)
        return tree

    def full_round(self, samples: list) -> tuple:
        """``full``: generate the whole trees of ``samples``, score them and keep the prompts with
        spread; returns ``(tree, samples, scored)`` of the round (for the fallback)."""
        K, M = self.K, self.M
        tree = self.count(self.generate(samples, M))
        scored = self.score(tree, samples)
        keep = has_spread(_rewards(scored, tree.B, K, M, self.penalty(tree))).tolist()
        for b in (i for i, k in enumerate(keep) if k):
            self.kept_trees.append(_select(tree, [b]))
            self.kept_samples.append(samples[b])
            self.kept_scored.extend(scored[b * K * M:(b + 1) * K * M])
        return tree, samples, scored

    def pilot_round(self, samples: list) -> tuple:
        """``pilot``: generate K thoughts x 1 answer of ``samples``, drop the prompts whose pilot
        rewards are all equal, complete the others with M-1 answers and keep them; returns
        ``(pilot tree, samples, pilot scored)`` of the round (for the fallback)."""
        K, M = self.K, self.M
        pilot, p_scored, idx, rest = self._pilot_trees(samples)
        if M > 1 and idx and rest is not None:
            full_tree = append_answers(_select(pilot, idx), rest)
            rest_scored = self.score(rest, [samples[i] for i in idx])
            self.kept_trees.append(full_tree)
            self.kept_samples.extend(samples[i] for i in idx)
            for j, b in enumerate(idx):
                for k in range(K):
                    self.kept_scored.append(p_scored[b * K + k])
                    self.kept_scored.extend(rest_scored[(j * K + k) * (M - 1):(j * K + k + 1) * (M - 1)])
        elif M == 1 and idx:
            self.kept_trees.append(_select(pilot, idx))
            self.kept_samples.extend(samples[i] for i in idx)
            self.kept_scored.extend(x for b in idx for x in p_scored[b * K:(b + 1) * K])
        return pilot, samples, p_scored

    def _pilot_trees(self, samples: list) -> tuple:
        """``(pilot tree, its scored pairs, indices of the prompts kept, tree of their M-1 new
        answers or None)``: through ``generate_pilot`` in one pass (M > 1), else ``generate(samples,
        1)`` then ``extend`` of the kept prompts (of prompt 0 when this rank keeps none but
        another rank extends: every rank calls ``extend``)."""
        got: dict = {}

        def decide(pilot):
            """Score the pilot pairs, drop the flat prompts; the prompts to complete ([] when no
            rank completes any, so every rank takes the same path)."""
            got.update(self._decide(pilot, samples))
            return got["idx"] if got["go"] else []

        if self.generate_pilot is not None and self.M > 1:
            _, rest = self.generate_pilot(samples, decide)
            if rest is not None:
                self.count(rest)
            return got["pilot"], got["p_scored"], got["idx"], rest
        pilot = self.generate(samples, 1)
        decide(pilot)
        rest = None
        if got["go"]:
            sub = _select(pilot, got["idx"] if got["idx"] else [0])
            rest = self.count(self.extend(sub, self.M - 1))
        return pilot, got["p_scored"], got["idx"], rest

    def _decide(self, pilot: TreeRollout, samples: list) -> dict:
        """Score ``pilot`` (K thoughts x 1 answer of ``samples``) and keep the prompts with spread
        (the others counted, and handed to ``on_drop``); returns ``{"pilot", "p_scored", "idx"
        (kept prompts), "go" (whether any rank completes its kept prompts; collective)}``."""
        K = self.K
        self.count(pilot)
        p_scored = self.score(pilot, samples)
        keep = has_spread(_rewards(p_scored, pilot.B, K, 1, self.penalty(pilot))).tolist()
        idx = [i for i, k in enumerate(keep) if k]
        self.stats["dynamic/pilot_dropped"] += len(samples) - len(idx)
        gone = [i for i, k in enumerate(keep) if not k]
        if self.on_drop is not None and gone:
            self.on_drop(_select(pilot, gone), [samples[i] for i in gone],
                         [x for b in gone for x in p_scored[b * K:(b + 1) * K]])
        go = self.M > 1 and self.any_rank(bool(idx))  # every rank extends (a ZeRO-3 gather is collective)
        return {"pilot": pilot, "p_scored": p_scored, "idx": idx, "go": go}

    def refill_size(self, target: int) -> int:
        """How many fresh prompts the next round draws: about what the shortfall needs at the
        keep rate seen so far (+1 spare), at least 1, at most ``target`` (a whole batch): a round
        for one missing prompt draws few."""
        rate = len(self.kept_samples) / max(self.stats["dynamic/prompts_sampled"], 1.0)
        need = max(1, target - len(self.kept_samples))
        n_draw = target if rate <= 0 else min(target, math.ceil(need / rate) + 1)
        return max(1, min(n_draw, target))

    def as_sampled(self, tree: TreeRollout, samples: list, scored: list, complete: bool) -> Collected:
        """Round 0 ``(tree, samples, scored)`` trained as it is (the fallback); ``complete``: a
        pilot tree first gets its other M-1 answers per thought."""
        K, M = self.K, self.M
        if complete:
            rest = self.count(self.extend(tree, M - 1))
            rest_scored = self.score(rest, samples)
            merged = []
            for b in range(tree.B):
                for k in range(K):
                    merged.append(scored[b * K + k])
                    merged.extend(rest_scored[(b * K + k) * (M - 1):(b * K + k + 1) * (M - 1)])
            tree, scored = append_answers(tree, rest), merged
        self.stats["dynamic/prompts_trained"] = float(tree.B)
        tree.stats = dict(self.work)
        return Collected(tree, list(samples), list(scored), self.stats)

    def kept(self, n: int) -> Collected:
        """The first ``n`` kept prompts as one tree, with their samples and scored pairs."""
        tree = cat_prompts(self.kept_trees)
        tree = _select(tree, range(n)) if n < tree.B else tree
        tree.stats = dict(self.work)
        self.stats["dynamic/prompts_trained"] = float(n)
        return Collected(tree, self.kept_samples[:n], self.kept_scored[: n * self.K * self.M], self.stats)


def run(cfg, backend, task, family, samples: Sequence, sampling: SamplingParams, more: Callable[[int], Sequence],
        score: Callable[[TreeRollout, Sequence], list]) -> Collected:
    """:func:`collect` with the trainer's pieces: ``cfg.rl``'s mode, tree and cap, the rollout
    ``backend`` (``generate_tree_from_messages``, ``generate_answers``), the task's messages, the
    soft overlong punishment and the collectives over the ranks. Every rank calls it."""
    from vlm_grpo_ma.algorithms.grpo_ma import overlong_penalty
    from vlm_grpo_ma.training import distributed as dist
    from vlm_grpo_ma.training.config import objective_settings

    rl, settings = cfg.rl, objective_settings(cfg.rl)
    return collect(
        rl.dynamic_sampling, samples, K=rl.num_thoughts, M=rl.answers_per_thought, target=len(samples),
        max_rounds=rl.dynamic_sampling_max_rounds,
        generate=lambda ss, m: backend.generate_tree_from_messages([task.messages(x, family) for x in ss],
                                                                   rl.num_thoughts, m, sampling),
        extend=lambda tree, m: backend.generate_answers(tree, m, sampling),
        generate_pilot=pilot_pass(backend, task, family, rl.num_thoughts, rl.answers_per_thought, sampling),
        score=score, penalty=lambda tree: overlong_penalty(settings, tree.thought_lengths(), tree.answer_lengths()), more=more,
        any_rank=lambda flag: dist.all_reduce_sum(float(flag)) > 0,
        min_rank=lambda n: int(min(dist.all_gather_objects(n))))


def pilot_pass(backend, task, family, K: int, M: int, sampling: SamplingParams) -> Optional[Callable]:
    """``generate_pilot`` for :func:`collect` from a backend that has ``generate_tree_pilot`` (the HF
    one), else None (the pilot then prefills the kept thoughts again, ``generate_answers``)."""
    if not hasattr(backend, "generate_tree_pilot") or M < 2:
        return None
    from vlm_grpo_ma.data.collate import build_generation_inputs

    def run_pilot(samples, decide):
        inputs = build_generation_inputs(backend.processor, [task.messages(x, family) for x in samples])
        return backend.generate_tree_pilot(inputs, K, M, sampling, decide)

    return run_pilot
