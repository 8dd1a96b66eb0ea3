"""Small statistics for comparing strategies over seeds and test images (t-intervals, paired
differences, non-inferiority within a margin, tuning curves)."""

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


# --- intervals with both sources of noise: seeds and test images ----------------------------
#
# A strategy's test accuracy varies with its training seed (initialisation, batch order) and
# with the draw of test images. `correct[s, i]` (1 if seed s classified test image i correctly)
# holds both. It is read as a two-way random-effects table with one observation per cell,
#     correct[s, i] = mu + seed_s + image_i + residual_si,
# whose mean over S seeds and N images has variance
#     sigma_seed^2 / S + sigma_image^2 / N + sigma_residual^2 / (S N).
# From the ANOVA mean squares (E[MS_seed] = sigma_res^2 + N sigma_seed^2, E[MS_image] =
# sigma_res^2 + S sigma_image^2, E[MS_residual] = sigma_res^2) the unbiased estimate is
#     (MS_seed + MS_image - MS_residual) / (S N)
# = (MS_seed - MS_residual) / (S N)  [the seed part]  +  var(per-image means) / N  [the image part],
# since var(per-image means) = MS_image / S. The seed part is floored at 0 (a negative estimate of
# a variance component). Adding var(per-seed accuracies) / S instead would count the residual
# twice (once in each part). A difference between two strategies is paired on the images and
# independent over seeds: each strategy's seed part, plus var(per-image differences of seed
# means) / N, which carries both strategies' residuals once. The interval is mean ± t * SE with
# Satterthwaite degrees of freedom, so a handful of seeds gets the wide t quantile it needs.


def _components(correct: np.ndarray) -> tuple[float, float]:
    """(seed variance component of the mean, its Satterthwaite degrees of freedom) of a seeds x
    images matrix: (MS_seed - MS_residual) / (S N), floored at 0."""
    seeds, images = correct.shape
    if seeds < 2:
        return 0.0, 1.0
    seed_means, image_means = correct.mean(axis=1), correct.mean(axis=0)
    ms_seed = images * float(seed_means.var(ddof=1))
    residual = correct - seed_means[:, None] - image_means[None, :] + correct.mean()
    df_residual = (seeds - 1) * (images - 1)
    ms_residual = float((residual**2).sum()) / df_residual if df_residual else 0.0
    scale = 1.0 / (seeds * images)
    component = scale * (ms_seed - ms_residual)
    if component <= 0:
        return 0.0, 1.0
    df = component**2 / ((scale * ms_seed) ** 2 / (seeds - 1) + (scale * ms_residual) ** 2 / max(df_residual, 1))
    return component, df


def _interval(mean: float, parts: list[tuple[float, int]], confidence: float) -> Interval:
    variance = sum(v for v, _ in parts)
    if variance == 0:
        return Interval(mean, mean, mean, len(parts))
    df = variance**2 / sum(v**2 / d for v, d in parts if v > 0)
    half = float(stats.t.ppf(0.5 + confidence / 2, df=df) * math.sqrt(variance))
    return Interval(mean, mean - half, mean + half, len(parts))


def accuracy_interval(correct: np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean accuracy of a (seeds x images) 0/1 matrix with an interval for seeds and images.
    `n` of the result is the number of seeds."""
    correct = np.asarray(correct, dtype=float)
    images = correct.shape[1]
    image_part = (float(correct.mean(axis=0).var(ddof=1) / images), images - 1)
    interval = _interval(float(correct.mean()), [_components(correct), image_part], confidence)
    return Interval(interval.mean, interval.low, interval.high, correct.shape[0])


def difference_interval(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean accuracy of `a` minus that of `b` (each seeds x images, the same images in the same
    order; seeds may differ), paired on images, independent over seeds. `n` = fewer seeds."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired on images: {a.shape[1]} vs {b.shape[1]} test images")
    per_image = a.mean(axis=0) - b.mean(axis=0)
    image_part = (float(per_image.var(ddof=1) / len(per_image)), len(per_image) - 1)
    mean = float(a.mean() - b.mean())
    interval = _interval(mean, [_components(a), _components(b), image_part], confidence)
    return Interval(interval.mean, interval.low, interval.high, min(a.shape[0], b.shape[0]))


@dataclass(frozen=True)
class NonInferiority:
    """Is `a` no worse than `b` by more than `margin`? One-sided bounds of the paired difference
    a - b (seeds and test images, `difference_interval`) at the stated confidence."""

    mean: float
    lower: float  # one-sided lower bound: a - b >= lower at the confidence
    upper: float  # one-sided upper bound
    margin: float

    @property
    def non_inferior(self) -> bool:
        """The lower bound lies above -margin: a loss of `margin` or more is ruled out."""
        return self.lower > -self.margin

    @property
    def worse(self) -> bool:
        """The upper bound lies below 0: significantly worse."""
        return self.upper < 0

    @property
    def verdict(self) -> str:
        """'non-inferior', 'worse' (and not non-inferior) or 'inconclusive' (neither shown)."""
        return "non-inferior" if self.non_inferior else "worse" if self.worse else "inconclusive"


def noninferiority(a: np.ndarray, b: np.ndarray, margin: float, confidence: float = 0.95) -> NonInferiority:
    """Non-inferiority of `a` against `b` (seeds x images each, paired on images) within `margin`
    (accuracy, >= 0): the one-sided `confidence` bounds are the ends of the two-sided
    (2 * confidence - 1) interval. Raises ValueError on a negative margin."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    interval = difference_interval(a, b, confidence=2 * confidence - 1)
    return NonInferiority(interval.mean, interval.low, interval.high, margin)


@dataclass(frozen=True)
class TuningCurve:
    """Expected best validation accuracy after n trials, n = 1..len(values) (Dodge et al. 2019,
    "Show Your Work": n configurations drawn with replacement from the trials observed)."""

    expected: list[float]  # E[max of n], n = 1..N
    std: list[float]  # its standard deviation (the band)

    @property
    def last_gain(self) -> float:
        """What the N-th trial is expected to add over N-1 (0.0 for a single trial)."""
        return self.expected[-1] - self.expected[-2] if len(self.expected) > 1 else 0.0


def tuning_curve(values: list[float]) -> TuningCurve:
    """The expected-maximum estimator: with the N values sorted v_1 <= ... <= v_N, the best of n
    draws is v_i with probability (i/N)^n - ((i-1)/N)^n; mean and standard deviation of that.
    Raises ValueError on an empty list."""
    if not values:
        raise ValueError("tuning_curve: no trial values")
    v = np.sort(np.asarray(values, dtype=float))
    cdf = np.arange(1, len(v) + 1) / len(v)
    expected, std = [], []
    for n in range(1, len(v) + 1):
        weight = cdf**n - np.concatenate(([0.0], cdf[:-1])) ** n
        mean = float(weight @ v)
        expected.append(mean)
        std.append(float(np.sqrt(max(0.0, weight @ v**2 - mean**2))))
    return TuningCurve(expected, std)


def accuracy_standard_error(accuracy: float, images: int) -> float:
    """Binomial standard error of one accuracy measured on `images` images."""
    return math.sqrt(accuracy * (1.0 - accuracy) / images)
