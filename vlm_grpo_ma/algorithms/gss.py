r"""Gradient Spike Score (GSS), from SPAM (Huang et al., 2025, "SPAM: Spike-Aware Adam").

SPAM defines, post hoc over a whole run of T+1 steps::

    GSS(g_i) = |g_i| / ( (1/(T+1)) sum_{j=0..T} |g_j| )

and GRPO-MA reports GSS@10, the number of steps whose GSS exceeds 10. During training only the
past is known, so :class:`GradientSpikeTracker` scores each step against the running mean of the
PAST gradient norms (the current step excluded, so a spike cannot hide itself by raising its own
baseline)::

    GSS_t = |g_t| / mean(|g_s| : s < t)     (all past steps, the last ``window``, or an EMA)

Conventions:

* first step (no history): GSS = 1.0, never a spike;
* a non-finite norm (inf / nan): GSS = inf, counted as a spike and in ``num_nonfinite``, and NOT
  added to the history (it would poison the baseline);
* a zero baseline (all past norms 0): GSS = 1.0 if |g_t| = 0, else inf.

:func:`gradient_spike_scores` computes SPAM's post-hoc definition over a finished series.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Optional, Sequence

import torch

__all__ = ["GradientSpikeTracker", "gradient_spike_scores"]


class GradientSpikeTracker:
    """Online GSS of a series of gradient norms, with spike counts and exact resume.

    Args:
        threshold: a step is a spike when GSS > threshold (10 gives GSS@10).
        window: baseline = mean of the last ``window`` finite norms; None = all past norms.
        ema: if set (in (0, 1)), baseline = exponential moving average with this decay
            (``b <- ema * b + (1 - ema) * |g|``, started at the first norm); excludes ``window``.
    """

    def __init__(self, threshold: float = 10.0, window: Optional[int] = None, ema: Optional[float] = None) -> None:
        if window is not None and ema is not None:
            raise ValueError("choose either window or ema, not both")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if ema is not None and not 0.0 < ema < 1.0:
            raise ValueError(f"ema must be in (0, 1), got {ema}")
        self.threshold = float(threshold)
        self.window = window
        self.ema = ema
        self.reset()

    def reset(self) -> None:
        self._history: deque[float] = deque(maxlen=self.window)  # used when window is set
        self._sum = 0.0  # sum of finite past norms (window=None, ema=None)
        self._count = 0  # number of finite past norms
        self._ema_value = 0.0
        self.num_steps = 0
        self.num_spikes = 0
        self.num_nonfinite = 0
        self.last_gss = float("nan")
        self.max_gss = 0.0

    def baseline(self) -> Optional[float]:
        """The running mean |g| the next step will be scored against (None before any step)."""
        if self._count == 0:
            return None
        if self.ema is not None:
            return self._ema_value
        if self.window is not None:
            return sum(self._history) / len(self._history)
        return self._sum / self._count

    def update(self, grad_norm: float | torch.Tensor) -> float:
        """Score one step's gradient norm, then add it to the history. Returns its GSS."""
        g = abs(float(grad_norm))
        base = self.baseline()
        if not math.isfinite(g):
            gss = math.inf
            self.num_nonfinite += 1
        elif base is None:
            gss = 1.0
        elif base == 0.0:
            gss = 1.0 if g == 0.0 else math.inf
        else:
            gss = g / base
        if math.isfinite(g):
            self._add(g)
        self.num_steps += 1
        if gss > self.threshold:
            self.num_spikes += 1
        self.last_gss = gss
        self.max_gss = max(self.max_gss, gss)
        return gss

    def _add(self, g: float) -> None:
        if self.ema is not None:
            self._ema_value = g if self._count == 0 else self.ema * self._ema_value + (1.0 - self.ema) * g
        elif self.window is not None:
            self._history.append(g)
        else:
            self._sum += g
        self._count += 1

    @property
    def spike_fraction(self) -> float:
        return self.num_spikes / self.num_steps if self.num_steps else 0.0

    def metrics(self) -> dict[str, float]:
        """``grad/gss`` (last), ``grad/gss_max``, ``grad/gss_spikes`` (count so far, GSS@threshold)."""
        return {"grad/gss": self.last_gss, "grad/gss_max": self.max_gss, "grad/gss_spikes": float(self.num_spikes)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "window": self.window,
            "ema": self.ema,
            "history": list(self._history),
            "sum": self._sum,
            "count": self._count,
            "ema_value": self._ema_value,
            "num_steps": self.num_steps,
            "num_spikes": self.num_spikes,
            "num_nonfinite": self.num_nonfinite,
            "last_gss": self.last_gss,
            "max_gss": self.max_gss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("threshold", "window", "ema"):
            if state[key] != getattr(self, key):
                raise ValueError(f"GradientSpikeTracker {key} mismatch: checkpoint {state[key]!r}, tracker {getattr(self, key)!r}")
        self._history = deque(state["history"], maxlen=self.window)
        self._sum = float(state["sum"])
        self._count = int(state["count"])
        self._ema_value = float(state["ema_value"])
        self.num_steps = int(state["num_steps"])
        self.num_spikes = int(state["num_spikes"])
        self.num_nonfinite = int(state["num_nonfinite"])
        self.last_gss = float(state["last_gss"])
        self.max_gss = float(state["max_gss"])


def gradient_spike_scores(grad_norms: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """SPAM's post-hoc GSS of a finished run: [T] norms -> [T] ``|g_i| / mean_j |g_j|`` (float64).

    Non-finite norms are left out of the mean and score inf. ``(scores > 10).sum()`` is GSS@10.
    """
    g = torch.as_tensor(grad_norms, dtype=torch.float64).abs().reshape(-1)
    finite = torch.isfinite(g)
    if not finite.any():
        return torch.full_like(g, math.inf)
    mean = g[finite].mean()
    scores = g / mean if mean > 0 else torch.where(g == 0, torch.ones_like(g), torch.full_like(g, math.inf))
    return torch.where(finite, scores, torch.full_like(g, math.inf))
