"""Small statistics for comparing strategies over seeds (t-intervals, paired t-tests)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None  # None when n < 2: no interval from a single value
    high: float | None
    n: int


def t_interval(values: list[float], confidence: float = 0.95) -> Interval:
    """Mean and two-sided Student-t confidence interval of `values` (independent seeds)."""
    array = np.asarray(values, dtype=float)
    n = len(array)
    mean = float(array.mean())
    if n < 2:
        return Interval(mean, None, None, n)
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1) * array.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


@dataclass(frozen=True)
class PairedTest:
    difference: Interval  # of a - b over the common seeds
    p_value: float | None  # two-sided paired t-test; None when n < 2 or all differences equal


def paired_t_test(a: dict[int, float], b: dict[int, float], confidence: float = 0.95) -> PairedTest:
    """Compare two strategies on the seeds they share: mean difference a - b, its t-interval,
    and the two-sided paired t-test p-value."""
    seeds = sorted(set(a) & set(b))
    differences = [a[s] - b[s] for s in seeds]
    interval = t_interval(differences, confidence) if seeds else Interval(float("nan"), None, None, 0)
    if len(seeds) < 2 or np.std(differences) == 0:
        return PairedTest(interval, None)
    return PairedTest(interval, float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue))
