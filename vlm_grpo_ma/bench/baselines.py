"""Constant-answer baselines for the geometric tasks: what a model scores that never looks at the
image and always answers the mean target of the training distribution.

A localisation claim ("the model finds the handle") means little unless the model beats this:
on synthetic affordance the mean box already scores ~0.06 mean IoU, on synthetic trajectory the
mean path scores a DFD of ~0.45.  The mean is taken over ``n_train`` samples of the training
distribution (not the held-out set), and scored with the task's own metrics on the held-out
samples, so that the figure is comparable with the model's held-out metrics.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["mean_target", "mean_target_baseline"]


def mean_target(targets: Sequence[dict[str, Any]]) -> tuple[str, Any] | None:
    """The element-wise mean of the targets' ``"box"`` ((4,) canonical xyxy) or ``"trajectory"``
    ((N, 2) canonical points; every target must have the same N) as ``(key, value)``; None when
    the targets have neither (detection's lists of boxes, VQA, math, code).

    >>> mean_target([{"box": [0, 0, 2, 2]}, {"box": [2, 2, 4, 4]}])
    ('box', [1.0, 1.0, 3.0, 3.0])
    """
    if not targets:
        return None
    for key in ("box", "trajectory"):
        if all(key in t for t in targets):
            arrays = [np.asarray(t[key], dtype=np.float64) for t in targets]
            if len({a.shape for a in arrays}) != 1:
                raise ValueError(f"mean_target: the {key!r} targets differ in shape ({sorted({a.shape for a in arrays})})")
            return key, np.mean(arrays, axis=0).tolist()
    return None


def mean_target_baseline(task, heldout: Sequence, train_samples: Sequence) -> dict[str, float] | None:
    """The task's metrics (``task.metrics``) on ``heldout`` when every prediction is the mean
    target of ``train_samples`` (:func:`mean_target`); None for a task without a single
    box or path per sample.  Predictions are in the task's canonical form, as ``task.parse``
    returns them (a box for affordance, a list of points for trajectory)."""
    mean = mean_target([s.target for s in train_samples])
    if mean is None:
        return None
    _, value = mean
    return task.metrics([value] * len(heldout), list(heldout))
