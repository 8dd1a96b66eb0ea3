"""The report's reading of the parameter-efficient study, on the committed params and made-up
results: surgical blocks are paired with the top-down strategies by their definitions, and block 1
(Lee et al.'s claim, prespecified) is tested against every other single block, clean and
corrupted, without choosing the comparison from the results."""

from __future__ import annotations

import numpy as np

from pipeline.analysis.recommendation import choose
from pipeline.core.params import load_params
from pipeline.core.results import PIXELS
from pipeline.core.stats import accuracy_interval
from pipeline.stages.report.__main__ import compared_metrics
from pipeline.stages.report.answer import rule_lines
from pipeline.stages.report.parameter_efficient import block_one_lines, surgical_pairs, surgical_table


def test_every_block_is_paired_with_the_strategy_that_trains_it_and_everything_above():
    params = load_params()
    main, study = list(params.variants), list(params.studies.parameter_efficient.strategies)
    assert surgical_pairs(params, main, study) == {
        "block1": ("surgical_block1", "full"),
        "block2": ("surgical_block2", "from_block2"),
        "block3": ("surgical_block3", "from_block3"),
        "block4": ("surgical_block4", "from_block4"),
        "block5": ("surgical_block5", "partial"),  # the same layers: the study's alone, the main one above
    }
    # cut, bias-only and LoRA strategies train other things: never paired
    assert surgical_pairs(params, ["cut3_partial", "last_layers"], ["bias_only", "lora_r4"]) == {}
    # the main strategies alone make no surgical section: it is the study's
    assert surgical_pairs(params, main, ["bias_only"]) == {}
    assert surgical_pairs(params, ["full"], ["surgical_block1"]) == {"block1": ("surgical_block1", "full")}
    assert surgical_pairs(params, [], ["surgical_block5"]) == {"block5": ("surgical_block5", None)}


def _result(correct: np.ndarray, corrupted: list[float] | None = None, val: float = 0.5) -> dict:
    result = {
        "evidence": {"correct": correct, "val_accuracy": val},
        "interval": accuracy_interval(correct),
        "parameters": {"trainable": 100},
    }
    if corrupted is not None:
        result["robustness"] = {s + 1: {"accuracy": {"blur": a, "contrast": a}} for s, a in enumerate(corrupted)}
    return result


def test_block_one_is_tested_against_every_other_block_clean_and_corrupted():
    rng = np.random.default_rng(0)
    correct = rng.integers(0, 2, (3, 400))
    better = correct.copy()
    better[:, :100] = 1  # block1 right on 100 more images... where `correct` was wrong
    everything = {
        "s1": _result(better, [0.70, 0.72, 0.71], val=0.6),
        "s2": _result(correct, [0.60, 0.61, 0.62], val=0.7),
        "s3": _result(better, [0.69, 0.73, 0.70], val=0.5),
    }
    pairs = {"block1": ("s1", None), "block2": ("s2", None), "block3": ("s3", None)}
    first, block2, block3 = block_one_lines(pairs, everything)
    assert first.startswith("The best single block on validation accuracy is block2")  # chosen on validation
    assert block2.startswith("block1 − block2: +0.")
    assert "(clean test: block1 better, supported)" in block2
    # corrupted, paired over seeds: 0.10, 0.11, 0.09 -> +0.100 with a t-interval far above 0
    assert "; +0.100 [" in block2 and block2.endswith("(corrupted test, over seeds: block1 better, supported).")
    assert block3.startswith("block1 − block3: +0.000 [+0.000, +0.000] (clean test: not significant")
    assert "(corrupted test, over seeds: not significant" in block3  # 0.01, -0.01, 0.01: spans 0
    assert block_one_lines({"block2": ("s2", None), "block3": ("s3", None)}, everything) == []  # no block1


def test_block_one_with_one_common_seed_or_none_says_only_what_it_can():
    correct = np.ones((1, 50), dtype=int)
    pairs = {"block1": ("s1", None), "block2": ("s2", None)}
    s1, s2 = _result(correct, [0.7]), _result(correct, [0.6])
    (_, line) = block_one_lines(pairs, {"s1": s1, "s2": s2})
    clean = "+0.000 [+0.000, +0.000] (clean test: not significant, which is not a claim that they are equal)"
    assert line == f"block1 − block2: {clean}; +0.100 (corrupted test, over seeds: one seed, no interval)."
    s2["robustness"] = {2: s2["robustness"][1]}  # another seed than block1's: nothing to pair
    (_, line) = block_one_lines(pairs, {"s1": s1, "s2": s2})
    assert line == f"block1 − block2: {clean}."
    del s2["robustness"]  # no robustness test: the clean comparison only
    assert block_one_lines(pairs, {"s1": s1, "s2": s2})[1] == line


def test_the_surgical_table_prints_a_paired_difference_only_where_both_ran():
    correct = np.ones((2, 50), dtype=int)
    everything = {"a": _result(correct), "b": _result(correct)}
    _, rows = surgical_table({"block2": ("a", "b"), "block3": ("a", None)}, everything)
    assert rows[0][0] == "block2" and rows[0][-1] == "+0.000 [+0.000, +0.000]"
    assert rows[1][4:] == ["—", "", "", "—"]


def test_the_answer_in_words_follows_the_rule_of_the_main_answer():
    """`rule_lines` (one function for the depth study and this one) on a real `choose`: the best,
    what is non-inferior with its bound, the cheaper one with the FLOP ratio, the rest in words."""
    rng = np.random.default_rng(0)
    truth = rng.random(400) < 0.8
    same = np.tile(truth, (3, 1)).astype(int)  # identical predictions: non-inferior at any margin
    worse = same.copy()
    worse[:, :120] = 0  # 30% of the images lost: significantly worse
    evidence = {
        "big": {"correct": same, "flops": 4e12, "val_accuracy": 0.9, "params_trainable": 10},
        "small": {"correct": same, "flops": 1e12, "val_accuracy": 0.8, "params_trainable": 5},
        "bad": {"correct": worse, "flops": 5e11, "val_accuracy": 0.7, "params_trainable": 1},
    }
    answer = choose(evidence, 0.02)
    lines = rule_lines(answer, among=" among every strategy and baseline")
    assert lines[0] == "Best on validation among every strategy and baseline: `big`."
    assert lines[1].startswith("Non-inferior to it within 0.02") and "`small` (+0.000)" in lines[1]
    assert "`small`, 4.0× cheaper than `big` (1 TFLOP vs 4 TFLOP)" in lines[2]
    prefix = "Not shown non-inferior: `bad` significantly worse (by at least "
    assert lines[3].startswith(prefix) and lines[3].endswith(").")
    loss = truth[:120].mean() * 120 / 400  # the true loss; the bound is below it
    assert 0.1 < float(lines[3][len(prefix) : -2]) < loss
    # only the best a candidate: nothing cheaper, no rest line when every other one is a candidate
    alone = rule_lines(choose({"big": evidence["big"], "bad": evidence["bad"]}, 0.02), name=str.upper)
    assert alone[1].endswith("none.") and alone[2] == "Nothing cheaper is shown non-inferior to BIG (4 TFLOP)."


def test_the_dvc_metric_holds_the_study_strategies_only_when_it_ran():
    summary = {
        "frozen": {"test_accuracy_mean": 0.7, "test_accuracy_ci95_low": 0.68, "test_accuracy_ci95_high": 0.72},
        "baselines": {PIXELS: {"test_accuracy": 0.75}},
    }
    assert set(compared_metrics(summary)) == set(compared_metrics(summary, {})) == {"frozen", "pixels_lr"}
    beyond = {"bias_only": {"interval": accuracy_interval(np.tile(np.arange(40) % 3 == 0, (2, 1)).astype(int))}}
    metrics = compared_metrics(summary, beyond)
    assert metrics["frozen"] == {"test_acc": 0.7, "ci_low": 0.68, "ci_high": 0.72}
    interval = beyond["bias_only"]["interval"]
    assert metrics["bias_only"] == {"test_acc": interval.mean, "ci_low": interval.low, "ci_high": interval.high}
    assert metrics["bias_only"]["test_acc"] == 14 / 40
