"""Statistics over seeds for the learning benchmarks: mean +- std, a 95% interval, and whether a
difference is detectable at the scale measured.

A benchmark repeats a comparison on ``n`` seeds (each seed: its own SFT model, its own data and
sampling).  Differences are PAIRED by seed (T4A4 and T16A1 of seed ``s`` start from the same SFT
model; the RL gain of seed ``s`` is its after-RL minus its after-SFT figure), so their interval is
the one-sample Student-t interval of the per-seed differences:

    mean(d) +- t_{n-1, 1 - alpha/2} * std(d) / sqrt(n),      std with n - 1 in the denominator.

The budget that would detect a difference is that of the same two-sided paired t-test at level
alpha: its power against a true difference delta with ``n`` seeds is, with the noncentral t
distribution T' (n - 1 degrees of freedom, noncentrality delta * sqrt(n) / std(d)),

    power = P(T' > t_{n-1, 1 - alpha/2}) + P(T' < -t_{n-1, 1 - alpha/2});

``seeds_needed`` is the smallest n whose power reaches ``power`` (0.8), ``detectable_effect`` the
smallest delta that n seeds detect with that power.  (The normal approximation
``((z_{1-alpha/2} + z_power) * std / delta)^2`` is far too optimistic at 3 seeds: it calls
1.62 std detectable where the t-test needs 3.26 std.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from scipy import stats as _st

__all__ = ["Interval", "detectable_effect", "mean_std", "paired_differences", "seeds_needed", "summarize", "t_interval",
           "t_test_power", "verdict"]

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


def t_test_power(effect_in_std: float, n: int, level: float = 0.95) -> float:
    """Power of the two-sided paired t-test at ``level`` with ``n`` seeds against a true mean
    difference of ``effect_in_std`` per-seed standard deviations (0.0 for n < 2)."""
    if n < 2:
        return 0.0
    df, ncp = n - 1, abs(effect_in_std) * math.sqrt(n)
    crit = float(_st.t.ppf(0.5 + level / 2, df))
    lower = float(_st.nct.cdf(-crit, df, ncp))  # the wrong-side tail: tiny, and NaN in scipy far out
    return float(_st.nct.sf(crit, df, ncp)) + (lower if math.isfinite(lower) else 0.0)


def seeds_needed(std: float, effect: float, level: float = 0.95, power: float = 0.8) -> float:
    """The fewest seeds (at least 2) with which a paired t-test detects a true difference
    ``effect`` whose per-seed spread is ``std`` with probability ``power``; ``inf`` when
    ``effect`` is 0 (or would need more than a million seeds); 2 when ``std`` is 0."""
    if effect == 0:
        return math.inf
    if std == 0:
        return 2.0
    d = abs(effect) / std
    lo, hi = 1, 2  # power(lo) < target <= power(hi)
    while t_test_power(d, hi, level) < power:
        lo, hi = hi, hi * 2
        if hi > 1_000_000:
            return math.inf
    while hi - lo > 1:  # power grows with n
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if t_test_power(d, mid, level) < power else (lo, mid)
    return float(hi)


def detectable_effect(std: float, n: int, level: float = 0.95, power: float = 0.8) -> float:
    """The smallest true difference that a paired t-test on ``n`` seeds detects with probability
    ``power`` (``inf`` for one seed: no test)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n < 2:
        return math.inf
    if std == 0:
        return 0.0
    from scipy.optimize import brentq

    hi = 1.0
    while t_test_power(hi, n, level) < power:
        hi *= 2
    return float(brentq(lambda d: t_test_power(d, n, level) - power, 0.0, hi, xtol=1e-10)) * std


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
