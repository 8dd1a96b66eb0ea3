"""Confidence intervals and paired tests against values computed by hand / textbook tables."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.stats import accuracy_interval, difference_interval, paired_t_test, t_interval


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
    # 2 seeds x 4 images: seed accuracies 0.75, 0.25 -> seed part var([.75, .25]) / 2 = 0.0625;
    # image means 1, .5, .5, 0 -> image part var / 4 = (1/6) / 4; Welch-Satterthwaite df
    correct = np.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    interval = accuracy_interval(correct)
    seed_part, image_part = 0.125 / 2, (1 / 6) / 4
    total = seed_part + image_part
    df = total**2 / (seed_part**2 / 1 + image_part**2 / 3)
    from scipy import stats

    assert interval.mean == 0.5 and interval.n == 2
    assert interval.high - interval.mean == pytest.approx(stats.t.ppf(0.975, df) * total**0.5)


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

    from pipeline.stats import tuning_curve

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
    from pipeline.stats import accuracy_standard_error

    assert accuracy_standard_error(0.7, 500) == pytest.approx(0.0205, abs=1e-4)
    assert accuracy_standard_error(0.7, 200) == pytest.approx(0.0324, abs=1e-4)
