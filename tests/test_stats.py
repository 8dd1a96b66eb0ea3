"""Confidence intervals and paired tests against values computed by hand / textbook tables."""

from __future__ import annotations

import pytest

from pipeline.stats import paired_t_test, t_interval


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
