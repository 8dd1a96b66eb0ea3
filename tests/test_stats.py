"""Confidence intervals and paired tests against values computed by hand / textbook tables."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.stats import accuracy_interval, difference_interval, paired_t_test, t_interval


def test_t_interval_matches_the_textbook_value():
    # mean 10, sample sd 2, n 4: half-width = t(0.975, 3) * 2 / 2 = 3.182446
    interval = t_interval([8.0, 10.0, 10.0, 12.0 - 0.0])
    sd = (((8 - 10) ** 2 + 0 + 0 + (12 - 10) ** 2) / 3) ** 0.5
    assert interval.mean == 10.0 and interval.n == 4
    assert interval.high - interval.mean == pytest.approx(3.182446 * sd / 2, rel=1e-5)
    assert interval.mean - interval.low == pytest.approx(interval.high - interval.mean)


def test_single_value_has_no_interval():
    interval = t_interval([0.7])
    assert (interval.mean, interval.low, interval.high, interval.n) == (0.7, None, None, 1)


def test_paired_t_test_matches_a_hand_computation():
    # differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt(3)) = 3.4641, df 2 -> p = 0.07418
    a = {1: 11.0, 2: 12.0, 3: 13.0, 9: 5.0}
    b = {1: 10.0, 2: 10.0, 3: 10.0}
    result = paired_t_test(a, b)
    assert result.difference.mean == 2.0 and result.difference.n == 3  # seed 9 has no pair
    assert result.p_value == pytest.approx(0.074180, abs=1e-5)


def test_paired_test_without_variation_or_pairs_gives_no_p_value():
    assert paired_t_test({1: 0.5, 2: 0.6}, {1: 0.4, 2: 0.5}).p_value is None  # constant difference
    assert paired_t_test({1: 0.5}, {1: 0.4}).p_value is None


def _simulate(rng, seeds: int, images: int, shift: float, seed_sd: float):
    """Two strategies on the same images: image difficulty z_i ~ N(1, 1.5) shared, strategy b
    `shift` easier on the logit scale, each seed its own offset ~ N(0, seed_sd)."""
    difficulty = rng.normal(1.0, 1.5, images)

    def run(offset):
        offsets = rng.normal(0.0, seed_sd, seeds)
        p = 1 / (1 + np.exp(-(difficulty + offset + offsets[:, None])))
        return (rng.uniform(size=p.shape) < p).astype(np.int8)

    return run(0.0), run(shift)


def _truth(shift: float, seed_sd: float) -> tuple[float, float]:
    """Expected accuracy of a and of b - a over images and seeds, by Monte Carlo (2 million draws)."""
    rng = np.random.default_rng(12345)
    z, e1, e2 = rng.normal(1.0, 1.5, 2_000_000), rng.normal(0, seed_sd, 2_000_000), rng.normal(0, seed_sd, 2_000_000)
    a = np.mean(1 / (1 + np.exp(-(z + e1))))
    return float(a), float(np.mean(1 / (1 + np.exp(-(z + shift + e2)))) - a)


@pytest.mark.parametrize(("seeds", "seed_sd"), [(3, 0.15), (5, 0.15), (5, 0.03)])
def test_seed_and_image_intervals_cover_the_truth_at_about_the_nominal_rate(seeds, seed_sd):
    """300 simulated experiments with a known truth: the 95% intervals of one strategy's accuracy
    and of a paired difference contain it in 90-99.5% of them, whether seeds or test images
    dominate the noise."""
    rng = np.random.default_rng(seeds)
    truth_a, truth_d = _truth(0.3, seed_sd)
    hits_a = hits_d = hits_seeds_only = 0
    repeats = 300
    for _ in range(repeats):
        a, b = _simulate(rng, seeds, 500, 0.3, seed_sd)
        interval, difference = accuracy_interval(a), difference_interval(b, a)
        hits_a += interval.low <= truth_a <= interval.high
        hits_d += difference.low <= truth_d <= difference.high
        seeds_only = t_interval(list(a.mean(axis=1)))
        hits_seeds_only += seeds_only.low <= truth_a <= seeds_only.high
    assert 0.90 <= hits_a / repeats <= 0.99
    assert 0.90 <= hits_d / repeats <= 0.995
    if seed_sd < 0.05:  # test images dominate: a t-interval over seeds alone (the old report) misses that
        assert hits_seeds_only / repeats < 0.9


def test_interval_matches_a_hand_computation():
    # 2 seeds x 4 images, grand mean 0.5. Seed means 0.75, 0.25: MS_seed = 4 * var = 0.5. Every
    # residual (y - seed mean - image mean + grand mean) is +-0.25: MS_residual = 8 * 0.0625 / 3.
    # Seed part (MS_seed - MS_residual) / 8 = 1/24; image part var([1, .5, .5, 0]) / 4 = 1/24.
    correct = np.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    interval = accuracy_interval(correct)
    ms_seed, ms_residual = 0.5, 0.5 / 3
    seed_part, image_part = (ms_seed - ms_residual) / 8, (1 / 6) / 4
    seed_df = seed_part**2 / ((ms_seed / 8) ** 2 / 1 + (ms_residual / 8) ** 2 / 3)
    total = seed_part + image_part
    df = total**2 / (seed_part**2 / seed_df + image_part**2 / 3)
    from scipy import stats

    assert seed_part == pytest.approx(1 / 24) and image_part == pytest.approx(1 / 24)
    assert interval.mean == 0.5 and interval.n == 2
    assert interval.high - interval.mean == pytest.approx(stats.t.ppf(0.975, df) * total**0.5)


def test_variance_estimate_is_unbiased_for_the_two_way_random_effects_model():
    """Gaussian seed, image and residual effects with known variances: the average estimated
    variance of the mean over 5000 tables matches sigma_seed^2/S + sigma_image^2/N +
    sigma_res^2/(S N) within 3%; adding var(seed accuracies)/S instead (the residual twice) is
    measurably too large."""
    from pipeline.core.stats import _components

    rng = np.random.default_rng(7)
    seeds, images, sd_seed, sd_image, sd_res = 3, 200, 0.1, 0.3, 0.4
    truth = sd_seed**2 / seeds + sd_image**2 / images + sd_res**2 / (seeds * images)
    estimates, doubled = [], []
    for _ in range(5000):
        y = (
            rng.normal(0, sd_seed, (seeds, 1))
            + rng.normal(0, sd_image, (1, images))
            + rng.normal(0, sd_res, (seeds, images))
        )
        image_part = y.mean(axis=0).var(ddof=1) / images
        estimates.append(_components(y)[0] + image_part)
        doubled.append(y.mean(axis=1).var(ddof=1) / seeds + image_part)
    assert np.mean(estimates) == pytest.approx(truth, rel=0.03)
    assert np.mean(doubled) > truth * 1.03  # the residual term is 6.6% of the truth here


def test_difference_is_paired_on_images():
    """b is right exactly where a is, plus 10 images: every per-image difference is 0 or 1 and the
    interval is narrow; shuffling b's images breaks the pairing and widens it."""
    rng = np.random.default_rng(0)
    a = (rng.uniform(size=(3, 400)) < 0.6).astype(np.int8)
    a[:] = a[0]  # no seed noise
    b = a.copy()
    b[:, np.flatnonzero(a[0] == 0)[:10]] = 1
    paired = difference_interval(b, a)
    assert paired.mean == pytest.approx(10 / 400)
    assert paired.low > 0
    unpaired = difference_interval(b[:, rng.permutation(400)], a)
    assert unpaired.high - unpaired.low > 3 * (paired.high - paired.low)
    with pytest.raises(ValueError, match="paired on images"):
        difference_interval(a, a[:, :10])


def test_tuning_curve_is_the_expected_best_of_n_draws_with_replacement():
    import itertools

    from pipeline.core.stats import tuning_curve

    values = [0.61, 0.7, 0.55, 0.7, 0.68]
    curve = tuning_curve(values)
    for n in range(1, len(values) + 1):  # every ordered draw of n trials, equally likely
        maxima = [max(draw) for draw in itertools.product(values, repeat=n)]
        assert curve.expected[n - 1] == pytest.approx(np.mean(maxima))
        assert curve.std[n - 1] == pytest.approx(np.std(maxima), abs=1e-9)
    assert curve.expected[0] == pytest.approx(np.mean(values)) and curve.expected[-1] < max(values)
    assert curve.last_gain == pytest.approx(curve.expected[-1] - curve.expected[-2])
    assert tuning_curve([0.5]).last_gain == 0.0
    with pytest.raises(ValueError, match="no trial values"):
        tuning_curve([])


def test_accuracy_standard_error_is_binomial():
    from pipeline.core.stats import accuracy_standard_error

    assert accuracy_standard_error(0.7, 500) == pytest.approx(0.0205, abs=1e-4)
    assert accuracy_standard_error(0.7, 200) == pytest.approx(0.0324, abs=1e-4)


def _boundary_tables(rng, seeds: int, images: int, margin: float, seed_sd: float):
    """Two strategies on the same images whose true accuracy difference (b - a) is exactly -margin:
    per-image probabilities q_i ~ U(0.1, 0.9) for a, q_i - margin for b, each seed shifted by
    N(0, seed_sd) on the probability scale (never clipped at these sizes)."""
    q = rng.uniform(0.1, 0.9, images)

    def run(shift):
        p = q[None, :] + shift + rng.normal(0.0, seed_sd, (seeds, 1))
        return (rng.uniform(size=(seeds, images)) < p).astype(np.int8)

    return run(0.0), run(-margin)


@pytest.mark.parametrize(("seeds", "seed_sd"), [(3, 0.02), (5, 0.02), (5, 0.003)])
def test_noninferiority_is_declared_at_most_5_percent_of_the_time_at_the_margin(seeds, seed_sd):
    """The decision's type I error: at a true loss of exactly the margin, 1000 simulated
    experiments (2000 test images) declare non-inferiority in at most 5% of them (plus two Monte
    Carlo standard errors)."""
    from pipeline.core.stats import noninferiority

    rng = np.random.default_rng(seeds * 100 + int(seed_sd * 1000))
    margin, repeats = 0.02, 1000
    declared = sum(
        noninferiority(b, a, margin).non_inferior
        for a, b in (_boundary_tables(rng, seeds, 2000, margin, seed_sd) for _ in range(repeats))
    )
    assert declared / repeats <= 0.05 + 2 * (0.05 * 0.95 / repeats) ** 0.5


def test_noninferiority_has_power_when_seeds_agree_and_is_hard_to_show_when_they_do_not():
    """No true loss, 5 seeds, 2000 images: with seeds that agree (SD 0.003) non-inferiority within
    0.02 is shown in most experiments; with seeds that spread (SD 0.02) it mostly is not: the
    margin must be read against the seed noise."""
    from pipeline.core.stats import noninferiority

    rng = np.random.default_rng(11)

    def rate(sd):
        return np.mean(
            [noninferiority(*_boundary_tables(rng, 5, 2000, 0.0, sd), 0.02).non_inferior for _ in range(200)]
        )

    assert rate(0.003) > 0.75 and rate(0.02) < 0.6


def test_noninferiority_verdicts_follow_the_one_sided_bounds():
    from scipy import stats

    from pipeline.core.stats import difference_interval, noninferiority

    rng = np.random.default_rng(3)
    a = (rng.uniform(size=(3, 1000)) < 0.7).astype(np.int8)
    a[:] = a[0]  # no seed noise: the bounds come from the images alone
    b = a.copy()
    b[:, np.flatnonzero(a[0] == 1)[:30]] = 0  # b loses 30 of 1000 images on every seed
    result = noninferiority(b, a, margin=0.01)
    ninety = difference_interval(b, a, confidence=0.90)
    assert (result.lower, result.upper) == (ninety.low, ninety.high)
    assert result.mean == pytest.approx(-0.03) and result.verdict == "worse" and not result.non_inferior
    assert noninferiority(b, a, margin=0.05).verdict == "non-inferior"
    c, d = np.ones((3, 200), np.int8), np.ones((3, 200), np.int8)
    c[:, 0] = 0
    d[:, 1:4] = 0  # d loses 3 images and gains 1 of 200: -0.01, neither shown on so few images
    wide = noninferiority(d, c, margin=0.01)
    assert wide.verdict == "inconclusive" and wide.lower < -0.01 and wide.upper >= 0
    half = stats.t.ppf(0.95, 999) * np.std(b.mean(axis=0) - a.mean(axis=0), ddof=1) / 1000**0.5
    assert result.lower == pytest.approx(-0.03 - half)  # one-sided 95%: t(0.95), images only
    with pytest.raises(ValueError, match="margin"):
        noninferiority(a, a, margin=-0.01)
