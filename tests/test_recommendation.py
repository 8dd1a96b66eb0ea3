"""The answer rule (pipeline/analysis/recommendation.py): best on validation, non-inferiority within the
margin on test, the cheapest candidate in FLOPs, the baselines as candidates, wording."""

import numpy as np
import pytest

from pipeline.analysis.recommendation import choose, describe
from pipeline.core.stats import noninferiority
from pipeline.runtime.errors import DataError

IMAGES = 2000


def _correct(accuracy: float, seeds: int = 5, spread: float = 0.002) -> np.ndarray:
    """seeds x IMAGES: the first round(accuracy x N) images right, each seed shifted by a little."""
    offsets = np.linspace(-spread, spread, seeds)
    return np.array([np.arange(IMAGES) < round((accuracy + o) * IMAGES) for o in offsets], dtype=np.int8)


def _strategy(accuracy, val, flops, trainable=10, **kw):
    return {"correct": _correct(accuracy, **kw), "val_accuracy": val, "flops": flops, "params_trainable": trainable}


def test_the_cheapest_strategy_shown_non_inferior_is_recommended():
    evidence = {
        "full": _strategy(0.750, 0.76, 100e12),
        "partial": _strategy(0.752, 0.74, 30e12),  # as good on test, cheaper: a candidate
        "frozen": _strategy(0.700, 0.70, 2e12),  # cheapest, 5 points worse: not
    }
    answer = choose(evidence, margin=0.01)
    assert answer["best_on_validation"] == "full"
    assert set(answer["candidates"]) == {"full", "partial"}
    assert answer["recommended"] == answer["recommended_network"] == "partial"
    assert answer["cheaper_than_best"] == pytest.approx(100 / 30)
    assert answer["comparisons"]["frozen"]["verdict"] == "worse"
    expected = noninferiority(evidence["partial"]["correct"], evidence["full"]["correct"], 0.01)
    assert answer["candidates"]["partial"]["lower_bound"] == expected.lower > -0.01
    assert answer["baselines_non_inferior"] == []


def test_a_difference_that_is_not_significant_is_not_enough():
    """3 seeds that spread by 0.04: `cheap` is 0.005 below the best, not significantly, but a loss
    beyond the margin cannot be ruled out: inconclusive, so not recommended."""
    evidence = {
        "best": _strategy(0.750, 0.76, 100e12, seeds=3, spread=0.02),
        "cheap": _strategy(0.745, 0.75, 1e12, seeds=3, spread=0.02),
    }
    answer = choose(evidence, margin=0.01)
    comparison = answer["comparisons"]["cheap"]
    assert comparison["verdict"] == "inconclusive" and comparison["lower_bound"] < -0.01 < 0 < comparison["upper_bound"]
    assert answer["recommended"] == "best" and list(answer["candidates"]) == ["best"]
    assert describe("cheap", comparison, 0.01) == (
        f"not shown non-inferior: cannot rule out a loss of up to {-comparison['lower_bound']:.3f}"
    )


def test_a_baseline_that_is_non_inferior_is_the_answer_and_the_network_is_kept_for_register():
    evidence = {"full": _strategy(0.750, 0.76, 100e12), "frozen": _strategy(0.700, 0.70, 2e12)}
    baselines = {"pixels_logistic_regression": {"correct": _correct(0.760, seeds=1, spread=0), "flops": 1e9}}
    answer = choose(evidence, margin=0.01, baselines=baselines)
    assert answer["baselines_non_inferior"] == ["pixels_logistic_regression"]
    assert answer["recommended"] == "pixels_logistic_regression"
    assert answer["recommended_network"] == "full"  # frozen is not non-inferior
    assert answer["cheaper_than_best"] == pytest.approx(1e5)
    assert describe("x", answer["comparisons"]["pixels_logistic_regression"], 0.01).startswith(
        "non-inferior within 0.010"
    )


def test_ties_in_validation_go_to_fewer_parameters_and_costs_decide_nothing_else():
    evidence = {
        "a": _strategy(0.75, 0.75, 10e12, trainable=100),
        "b": _strategy(0.75, 0.75, 20e12, trainable=50),
    }
    answer = choose(evidence, margin=0.01)
    assert answer["best_on_validation"] == "b"
    assert answer["recommended"] == "a"  # the same predictions, non-inferior within 0.01, and cheaper
    assert choose(evidence, margin=0.0)["recommended"] == "b"  # a zero margin needs a difference shown > 0


def test_bad_inputs_name_the_problem():
    with pytest.raises(DataError, match="no strategy results"):
        choose({}, margin=0.01)
    clash = {"pixels_logistic_regression": _strategy(0.7, 0.7, 1.0)}
    with pytest.raises(DataError, match="share a name"):
        choose(clash, 0.01, {"pixels_logistic_regression": {"correct": _correct(0.7, 1, 0), "flops": 1.0}})
