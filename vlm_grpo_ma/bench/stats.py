"""Statistics over seeds for the learning benchmarks: mean +- std, a 95% interval, and whether a
difference is detectable at the scale measured.

A benchmark repeats a comparison on ``n`` seeds (each seed: its own SFT model, its own data and
sampling).  Differences are PAIRED by seed (T4A4 and T16A1 of seed ``s`` start from the same SFT
model; the RL gain of seed ``s`` is its after-RL minus its after-SFT figure), so their interval is
the one-sample Student-t interval of the per-seed differences:

    mean(d) +- t_{n-1, 1 - alpha/2} * std(d) / sqrt(n),      std with n - 1 in the denominator.

The budget that would detect a difference uses the usual normal approximation of a two-sided
paired test at level alpha with power ``power``:

    n = ((z_{1 - alpha/2} + z_{power}) * std(d) / |delta|)^2,

and the smallest difference detectable with ``n`` seeds is ``(z_{1 - alpha/2} + z_power) * std / sqrt(n)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from scipy import stats as _st

__all__ = ["Interval", "detectable_effect", "mean_std", "paired_differences", "seeds_needed", "summarize", "t_interval", "verdict"]

NO_DIFFERENCE = "no detectable difference at this scale"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with n - 1); the std is 0.0 for one value.
    Raises ValueError on an empty sequence or a non-finite value."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_std of no values")
    if not all(math.isfinite(v) for v in xs):
        raise ValueError(f"non-finite value in {xs}")
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in xs) / (len(xs) - 1))


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t interval of the mean at ``level``; (nan, nan) with fewer than 2 values."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    m, s = mean_std(values)
    n = len(values)
    if n < 2:
        return float("nan"), float("nan")
    half = float(_st.t.ppf(0.5 + level / 2, n - 1)) * s / math.sqrt(n)
    return m - half, m + half


def paired_differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """``a[i] - b[i]`` per seed; the two must be the same length (one value per seed each)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same number of seeds: {len(a)} vs {len(b)}")
    return [float(x) - float(y) for x, y in zip(a, b)]


def _z_sum(level: float, power: float) -> float:
    return float(_st.norm.ppf(0.5 + level / 2) + _st.norm.ppf(power))


def seeds_needed(std: float, effect: float, level: float = 0.95, power: float = 0.8) -> float:
    """Seeds a paired comparison needs to detect a true difference ``effect`` whose per-seed
    spread is ``std`` (normal approximation; at least 2).  ``inf`` when ``effect`` is 0."""
    if effect == 0:
        return math.inf
    return max(2.0, float(math.ceil((_z_sum(level, power) * std / abs(effect)) ** 2)))


def detectable_effect(std: float, n: int, level: float = 0.95, power: float = 0.8) -> float:
    """The smallest true difference that ``n`` seeds detect with probability ``power``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return _z_sum(level, power) * std / math.sqrt(n)


def verdict(lo: float, hi: float, name_a: str = "A", name_b: str = "B") -> str:
    """``"A > B"`` when the interval of A - B lies above 0, ``"A < B"`` below it, else
    :data:`NO_DIFFERENCE` (also for an undefined interval)."""
    if math.isnan(lo) or math.isnan(hi):
        return NO_DIFFERENCE
    if lo > 0:
        return f"{name_a} > {name_b}"
    if hi < 0:
        return f"{name_a} < {name_b}"
    return NO_DIFFERENCE


@dataclass
class Interval:
    """Summary of per-seed values (or per-seed paired differences)."""

    n: int
    mean: float
    std: float
    lo: float
    hi: float
    verdict: str
    #: seeds that would detect the observed mean difference (power 0.8) and the smallest
    #: difference the ``n`` seeds detect
    seeds_to_detect: float
    detectable: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:+.4f} +- {self.std:.4f} (95% CI [{self.lo:+.4f}, {self.hi:+.4f}], n={self.n})"


def summarize(diffs: Sequence[float], name_a: str = "A", name_b: str = "B", level: float = 0.95) -> Interval:
    """:class:`Interval` of paired differences A - B over seeds."""
    m, s = mean_std(diffs)
    lo, hi = t_interval(diffs, level)
    return Interval(
        n=len(diffs), mean=m, std=s, lo=lo, hi=hi, verdict=verdict(lo, hi, name_a, name_b),
        seeds_to_detect=seeds_needed(s, m, level), detectable=detectable_effect(s, len(diffs), level),
    )
