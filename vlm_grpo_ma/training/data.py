"""Where the samples of each step come from: a pure function of (seed, step).

Because a step's batch depends on nothing but the seed and the step number, the data position
of a resumed run is just its step: no iterator state to save, and 1 rank or N ranks see the same
global batch (each rank takes its contiguous slice, :func:`distributed.shard`).

- synthetic (no ``train_data``): fresh samples every step from ``task.synthetic(n, seed)`` with a
  per-step seed; the held-out set uses seeds from a disjoint range;
- a dataset: loaded once (``vlm_grpo_ma.data.sources.load_samples``), read in a fresh
  permutation each epoch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: synthetic training seeds are stage_seed_base(seed, stage) + step (= seed * _STRIDE + offset + step);
#: evaluation seeds start at _EVAL_BASE
_STRIDE = 1_000_003
_EVAL_BASE = 2_000_000_000
#: dynamic sampling's refill rounds: seeds from _EXTRA_BASE on (64 rounds per step at most)
_EXTRA_BASE = 3_000_000_000
STAGE_OFFSETS = {"sft": 0, "rl": 500_000}


def stage_seed_base(seed: int, stage: str) -> int:
    """The synthetic seed of step 0 of ``stage`` (``"sft"`` or ``"rl"``) in a run with ``seed``:
    step ``k`` of that stage draws ``task.synthetic(batch_size, seed=stage_seed_base(seed, stage) + k)``
    (:meth:`SampleStream.batch`).  A run's seeds lie ``_STRIDE`` (1,000,003) apart, so the seed
    ranges of different runs and of the two stages (``STAGE_OFFSETS``) never meet.  Benchmarks use
    it to draw samples from a stage's training distribution, e.g. for a mean-target baseline."""
    if stage not in STAGE_OFFSETS:
        raise ValueError(f"unknown stage {stage!r}: one of {sorted(STAGE_OFFSETS)}")
    return int(seed) * _STRIDE + STAGE_OFFSETS[stage]


class SampleStream:
    """The global batch of any step.

    Args:
        task: the task plugin.
        batch_size: samples per step (global, over all ranks).
        seed: the run's seed.
        stage: ``"sft"`` or ``"rl"`` (each stage draws its own synthetic samples).
        samples: a loaded dataset; None for synthetic samples.
    """

    def __init__(self, task, batch_size: int, seed: int, stage: str, samples: Sequence | None = None):
        self.task = task
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.stage = stage
        self.samples = list(samples) if samples is not None else None
        if self.samples is not None and not self.samples:
            raise ValueError("the training dataset is empty")
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, STAGE_OFFSETS[self.stage], epoch])
            self._perm = rng.permutation(len(self.samples))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> list:
        """The ``batch_size`` samples of ``step`` (same on every rank and every run)."""
        if self.samples is None:
            s = stage_seed_base(self.seed, self.stage) + step
            return synthetic_batch(self.task, self.batch_size, s)
        n = len(self.samples)
        out = []
        for i in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, pos = divmod(i, n)
            out.append(self.samples[int(self._permutation(epoch)[pos])])
        return out


    def extra(self, step: int, rnd: int) -> list:
        """``batch_size`` fresh samples for extra round ``rnd`` >= 1 of ``step`` (dynamic sampling's
        refill), the same on every rank and every run: synthetic ones from a seed range no step
        uses, or a dataset's samples drawn at random (without replacement within the round)."""
        if self.samples is None:
            return synthetic_batch(self.task, self.batch_size, _EXTRA_BASE + (self.seed * _STRIDE + step) * 64 + rnd)
        rng = np.random.default_rng([self.seed, STAGE_OFFSETS[self.stage], 7, step, rnd])
        n = len(self.samples)
        idx = rng.permutation(n)[: self.batch_size] if self.batch_size <= n else rng.integers(0, n, self.batch_size)
        return [self.samples[int(i)] for i in idx]


def synthetic_batch(task, n: int, seed: int) -> list:
    """``task.synthetic(n, seed)`` as a list (the task generators never fail on a seed: a layout
    that does not fit at random is placed deterministically, ``vlm_grpo_ma.tasks._synthetic.place_boxes``)."""
    return list(task.synthetic(n, seed=seed))


def heldout_samples(task, n: int, seed: int, samples: Sequence | None = None) -> list:
    """The evaluation set: the first ``n`` of a loaded held-out dataset, or ``n`` synthetic
    samples drawn with a seed no training step uses."""
    if samples is not None:
        return list(samples)[:n]
    return synthetic_batch(task, n, _EVAL_BASE + seed)


def target_token_lengths(task, family, tokenizer, samples: Sequence, prefix: str = "") -> np.ndarray:
    """(N, 2) int array: the token counts of each sample's SFT target thought (up to and with
    ``</think>``) and answer (the rest, plus the end-of-turn token the answer stops on), as the
    RL rollouts count them against ``max_thought_tokens`` / ``max_answer_tokens``.  ``prefix``:
    what the generation prompt already wrote (``"<think>\\n"``, thinking templates), not generated."""
    from vlm_grpo_ma.format import completion_after_prefix, split_completion

    out = np.zeros((len(samples), 2), dtype=np.int64)
    for i, sample in enumerate(samples):
        thought, answer = split_completion(completion_after_prefix(task.sft_target(sample, family), prefix))
        out[i] = (len(tokenizer(thought, add_special_tokens=False)["input_ids"]),
                  len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1)
    return out


def length_cap_report(lengths: np.ndarray, max_thought_tokens: int, max_answer_tokens: int) -> dict:
    """How many SFT targets would not fit the RL length caps.  ``lengths``: (N, 2) from
    :func:`target_token_lengths`.  Returns ``{"n", "thought_max", "answer_max",
    "thought_over", "answer_over"}`` (the last two: fractions of the N targets longer than the cap).

    A target over a cap is a configuration error the run would not otherwise show: the policy is
    taught a thought it may not finish in RL, where a thought cut at the cap is closed and flagged,
    and an answer cut at its cap fails the format check and earns 0."""
    lengths = np.asarray(lengths).reshape(-1, 2)
    if len(lengths) == 0:
        return {"n": 0, "thought_max": 0, "answer_max": 0, "thought_over": 0.0, "answer_over": 0.0}
    return {
        "n": int(len(lengths)),
        "thought_max": int(lengths[:, 0].max()),
        "answer_max": int(lengths[:, 1].max()),
        "thought_over": float((lengths[:, 0] > max_thought_tokens).mean()),
        "answer_over": float((lengths[:, 1] > max_answer_tokens).mean()),
    }
