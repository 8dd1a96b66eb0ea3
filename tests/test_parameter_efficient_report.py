"""The report's reading of the parameter-efficient study, on the committed params and made-up
results: surgical blocks are paired with the top-down strategies by their definitions, and the
shift check names the block with the best corrupted accuracy and tests the others against it."""

from __future__ import annotations

import numpy as np

from pipeline.core.params import load_params
from pipeline.core.stats import accuracy_interval
from pipeline.stages.report.parameter_efficient import shift_lines, surgical_pairs, surgical_table


def test_every_block_is_paired_with_the_strategy_that_trains_it_and_everything_above():
    params = load_params()
    names = [*params.variants, *params.studies.parameter_efficient.strategies]
    assert surgical_pairs(params, names) == {
        "block1": ("surgical_block1", "full"),
        "block2": ("surgical_block2", "from_block2"),
        "block3": ("surgical_block3", "from_block3"),
        "block4": ("surgical_block4", "from_block4"),
        "block5": ("surgical_block5", "partial"),  # the same layers: the study's alone, the main one above
    }
    # cut, bias-only and LoRA strategies train other things: never paired
    assert surgical_pairs(params, ["cut3_partial", "bias_only", "lora_r4", "last_layers"]) == {}
    assert surgical_pairs(params, ["partial"]) == {"block5": ("partial", None)}


def _result(correct: np.ndarray, corrupted: list[float] | None = None) -> dict:
    result = {
        "evidence": {"correct": correct},
        "interval": accuracy_interval(correct),
        "parameters": {"trainable": 100},
    }
    if corrupted is not None:
        result["robustness"] = {s + 1: {"accuracy": {"blur": a, "contrast": a}} for s, a in enumerate(corrupted)}
    return result


def test_the_shift_check_names_the_best_block_under_corruption_and_tests_the_others_against_it():
    rng = np.random.default_rng(0)
    correct = rng.integers(0, 2, (3, 200))
    everything = {
        "s1": _result(correct, [0.70, 0.72, 0.71]),
        "s2": _result(correct, [0.60, 0.61, 0.62]),
        "s3": _result(correct, [0.69, 0.73, 0.70]),
    }
    pairs = {"block1": ("s1", None), "block2": ("s2", None), "block3": ("s3", None)}
    lines = shift_lines(pairs, everything)
    assert lines[0].startswith(
        "On the corrupted test set (mean over the corruptions) the most accurate single block is block1 (0.710)"
    )
    by_block = {line.split(" ")[2]: line for line in lines[1:]}
    # s1 - s2 per seed: 0.10, 0.11, 0.09 -> mean 0.10, a t-interval far above 0
    assert "block1 − block2 under corruption: +0.100 [" in by_block["block2"] and by_block["block2"].endswith(
        "supported."
    )
    assert "not significant" in by_block["block3"]  # 0.01, -0.01, 0.01: the interval spans 0
    assert shift_lines({"block1": ("s1", None)}, everything) == []  # one block: nothing to compare


def test_the_surgical_table_prints_a_paired_difference_only_where_both_ran():
    correct = np.ones((2, 50), dtype=int)
    everything = {"a": _result(correct), "b": _result(correct)}
    _, rows = surgical_table({"block2": ("a", "b"), "block3": ("a", None)}, everything)
    assert rows[0][0] == "block2" and rows[0][-1] == "+0.000 [+0.000, +0.000]"
    assert rows[1][4:] == ["—", "", "", "—"]
