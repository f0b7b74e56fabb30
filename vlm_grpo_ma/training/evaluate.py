"""Held-out evaluation: greedy (or sampled) completions, the task's parser and the task's metrics.

Used for the summary's before-SFT / after-SFT / after-RL rows (greedy), and for the reward at the
training temperature that RL actually optimises (one sample per held-out prompt).  Each rank decodes its share of
the samples on gathered parameters (no collective per forward, so unequal lengths cannot
deadlock); predictions are gathered to every rank and scored with ``task.metrics``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections import Counter
from typing import Any, Sequence

from vlm_grpo_ma.training import distributed as dist

log = logging.getLogger(__name__)


def parse_completion(task, completion: str, sample, family) -> tuple[Any, str | None]:
    """(prediction, None) for a well-formed completion, (None, reason) otherwise; never raises
    (:func:`vlm_grpo_ma.format.parse_completion`, the benchmark's strict rule)."""
    from vlm_grpo_ma.format import parse_completion as _parse

    return _parse(task, completion, sample, family)


def evaluate(
    model,
    processor,
    family,
    task,
    samples: Sequence,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 96,
    gather_context=None,
    sampling=None,
    completions_out: dict | None = None,
) -> dict[str, float]:
    """The task's metrics of greedy predictions on ``samples``, plus ``eval/reward`` (the mean
    task reward, what RL maximises), ``eval/format_rate`` and ``eval/parse/<reason>`` counts.
    Collective when distributed: every rank calls it.

    Args:
        model: the policy (engine module, peft model or plain transformers model).
        gather_context: zero-argument callable returning the context that holds full
            parameters (ZeRO-3), entered once around all of this rank's generation.
        sampling: a ``SamplingParams`` to sample one completion per sample with (e.g. at the
            RL temperature) instead of decoding greedily; its length limits are replaced by
            ``max_new_tokens``.
        completions_out: a dict filled (on every rank) with ``{i: (completion, prediction,
            parse-failure reason)}`` of every sample, for drawing predictions.
    """
    from vlm_grpo_ma.rollout import HFRolloutBackend, SamplingParams

    n = len(samples)
    if n == 0:
        return {}
    world, rank = dist.world_size(), dist.rank()
    mine = list(range(rank, n, world))
    backend = HFRolloutBackend(model, processor=processor)
    if sampling is None:
        params = SamplingParams(temperature=0.0, max_thought_tokens=max_new_tokens, max_answer_tokens=max_new_tokens)
    else:
        params = dataclasses.replace(sampling, max_thought_tokens=max_new_tokens, max_answer_tokens=max_new_tokens)
    completions: dict[int, str] = {}
    ctx = gather_context() if gather_context is not None else contextlib.nullcontext()
    with ctx:
        for i in range(0, len(mine), batch_size):
            idx = mine[i : i + batch_size]
            msgs = [task.messages(samples[j], family) for j in idx]
            texts = backend.generate(msgs, n=1, sampling=params, max_new_tokens=max_new_tokens)
            for j, t in zip(idx, texts):
                completions[j] = t[0]
    merged: dict[int, str] = {}
    for part in dist.all_gather_objects(completions):
        merged.update(part)
    from vlm_grpo_ma.format import split_completion
    from vlm_grpo_ma.reward_guard import RewardGuard

    preds, reasons = [], Counter()
    for j in range(n):
        pred, reason = parse_completion(task, merged[j], samples[j], family)
        preds.append(pred)
        if reason:
            reasons[reason] += 1
        if completions_out is not None:
            completions_out[j] = (merged[j], pred, reason)
    # the task reward of each completion, through the one reward guard (as the trainer scores)
    rewards = [r.total for r in RewardGuard(task).batch([(*split_completion(merged[j]), samples[j], family)
                                                         for j in range(n)])]
    try:
        metrics = {k: float(v) for k, v in task.metrics(preds, list(samples)).items()}
    except Exception as e:
        raise RuntimeError(f"task {task.name!r}: metrics() failed on {n} predictions: {e}") from e
    metrics["eval/reward"] = sum(rewards) / n
    metrics["eval/format_rate"] = sum(p is not None for p in preds) / n
    for r, c in sorted(reasons.items()):
        metrics[f"eval/parse/{r}"] = float(c)
    metrics = {k: (v if math.isfinite(v) else float("nan")) for k, v in metrics.items()}
    return metrics
