"""Where the samples of each step come from: a pure function of (seed, step).

Because a step's batch depends on nothing but the seed and the step number, the data position
of a resumed run is just its step: no iterator state to save, and 1 rank or N ranks see the same
global batch (each rank takes its contiguous slice, :func:`distributed.shard`).

- synthetic (no ``train_data``): fresh samples every step from ``task.synthetic(n, seed)`` with a
  per-step seed; the held-out set uses seeds from a disjoint range;
- a dataset: loaded once (``vlm_grpo_ma.data.loaders.load_samples``), read in a fresh
  permutation each epoch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: synthetic training seeds are seed * _STRIDE + offset + step; evaluation seeds start at _EVAL_BASE
_STRIDE = 1_000_003
_EVAL_BASE = 2_000_000_000
STAGE_OFFSETS = {"sft": 0, "rl": 500_000}


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
            s = self.seed * _STRIDE + STAGE_OFFSETS[self.stage] + step
            return synthetic_batch(self.task, self.batch_size, s)
        n = len(self.samples)
        out = []
        for i in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, pos = divmod(i, n)
            out.append(self.samples[int(self._permutation(epoch)[pos])])
        return out


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
