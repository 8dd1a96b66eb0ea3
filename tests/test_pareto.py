"""The report's accuracy-against-cost section: the front on the means, which strategy dominates
which, and whether the paired difference supports it."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.stats import accuracy_interval, difference_interval
from pipeline.stages.report import pareto

IMAGES = 400


def _result(trainable: int, flops: float, correct_images: int, seed_jitter: int = 0) -> dict:
    """A strategy whose 3 seeds each get the first `correct_images` test images right (one seed
    `seed_jitter` more), so its mean accuracy is known and its predictions pair image by image."""
    correct = np.zeros((3, IMAGES))
    for seed in range(3):
        correct[seed, : correct_images + (seed_jitter if seed == 0 else 0)] = 1
    return {
        "parameters": {"trainable": trainable},
        "evidence": {"flops": flops, "correct": correct},
        "interval": accuracy_interval(correct),
    }


@pytest.fixture
def results():
    return {
        "cheap_weak": _result(trainable=1_000, flops=5e11, correct_images=240),
        "cheap_strong": _result(trainable=10_000, flops=1e12, correct_images=320),
        "dear_weak": _result(trainable=1_000_000, flops=5e13, correct_images=280),
        # dominated by cheap_strong by two images on one seed only: not significant
        "dear_close": _result(trainable=2_000_000, flops=2e12, correct_images=320, seed_jitter=-2),
        "flops_only": _result(trainable=50_000, flops=8e13, correct_images=330),  # on both fronts: the most accurate
    }


def test_the_front_is_every_strategy_no_other_beats_on_both_cost_and_mean_accuracy(results):
    by_parameters = pareto.points(results, "parameters")
    assert by_parameters["cheap_strong"] == (10_000.0, pytest.approx(0.8))
    assert pareto.front(by_parameters) == ["cheap_weak", "cheap_strong", "flops_only"]
    assert pareto.front(pareto.points(results, "flops")) == ["cheap_weak", "cheap_strong", "flops_only"]


def test_a_dominated_strategy_names_the_most_accurate_strategy_that_dominates_it(results):
    at = pareto.points(results, "parameters")
    assert pareto.dominated_by(at, "dear_weak") == "flops_only"  # cheap_strong dominates it too, less accurate
    assert pareto.dominated_by(at, "cheap_strong") is None
    assert pareto.dominated_by(pareto.points(results, "flops"), "dear_weak") == "cheap_strong"


def test_equal_cost_and_accuracy_dominate_neither_way():
    same = {"a": (10.0, 0.7), "b": (10.0, 0.7)}
    assert pareto.front(same) == ["a", "b"]
    assert pareto.dominated_by(same, "a") is None


def test_the_table_prints_the_paired_difference_and_whether_it_is_supported(results):
    headers, rows = pareto.table(results)
    assert headers == ["strategy", "trainable parameters", "training cost", "test accuracy", "parameters", "FLOPs"]
    by_name = {row[0]: row for row in rows}
    assert [row[0] for row in rows] == ["`cheap_weak`", "`cheap_strong`", "`flops_only`", "`dear_weak`", "`dear_close`"]
    d = difference_interval(results["flops_only"]["evidence"]["correct"], results["dear_weak"]["evidence"]["correct"])
    assert d.low > 0
    assert by_name["`dear_weak`"][4] == f"by `flops_only`: +{d.mean:.3f} [+{d.low:.3f}, +{d.high:.3f}] (supported)"
    assert by_name["`cheap_strong`"][4] == by_name["`flops_only`"][5] == "on the front"
    assert by_name["`dear_close`"][4].startswith("by `flops_only`:")
    assert by_name["`dear_close`"][5].startswith("by `cheap_strong`: +0.002 [")
    assert by_name["`dear_close`"][5].endswith("(not significant)")
    assert by_name["`flops_only`"][2] == "80 TFLOP" and by_name["`flops_only`"][1] == "50,000"


def test_the_section_is_left_out_without_its_figure(results):
    assert pareto.blocks(results, {}) == []
    kinds = [block[0] for block in pareto.blocks(results, {"pareto": "pareto.png"})]
    assert kinds == ["h2", "p", "figure", "table"]
