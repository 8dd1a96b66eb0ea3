"""The benchmark's arithmetic and a smoke run of `python -m pipeline.tools.bench` on tiny data.

Timings themselves are never asserted: only that the benchmark measures what it says."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.core.fit import Splits
from pipeline.core.model import ModelSpec, build_model
from pipeline.core.params import load_params
from pipeline.tools.bench import measure, tables
from tests.conftest import REPO, make_tiny_project, run_stage, stage_env


def test_vgg16_conv_flops_match_the_published_15_3_gmacs_at_224():
    model = build_model(ModelSpec(image_size=224, num_classes=10), None)
    flops = measure.conv_flops(model)
    assert len(flops) == 13
    assert sum(flops.values()) / 2 == pytest.approx(15.35e9, rel=0.005)
    assert flops["block1_conv2"] == 2 * 224 * 224 * 3 * 3 * 64 * 64


def test_flop_bound_orders_the_strategies_by_what_caching_can_save():
    import numpy as np

    params = load_params(REPO / "params.yaml")
    labels = np.zeros(params.data.train_per_class * 10, dtype=np.int64)
    splits = Splits((None, labels), (None, labels[: params.data.val_per_class * 10]))
    bound = measure.flop_bound(params, 10, splits)
    assert bound["scratch"] == 1.0 and bound["full"] == 1.0  # nothing frozen in front: nothing to cache
    assert bound["frozen"] > bound["last_layers"] > bound["partial"] > 1.0


def test_stats_are_median_min_max_and_count():
    assert measure.stats([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}


@pytest.mark.slow
def test_bench_runs_every_section_on_tiny_data_and_writes_the_report(tmp_path):
    params, prepared = make_tiny_project(tmp_path, {"frozen": {"trainable": "none"}, "full": {"trainable": "all"}})
    out = tmp_path / "reports"
    common = ["--params", str(params), "--prepared", str(prepared), "--out", str(out), "--repeats", "2"]
    for extra in (
        ["--large-images", "100", "--large-size", "32", "--synthetic-images", "64"],
        ["--tune", "--tune-trials", "2"],
    ):
        proc = run_stage("tools.bench", *common, *extra, env=stage_env(tmp_path), timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "benchmark.json").read_text())
    assert [row["variant"] for row in result["strategies"]] == ["frozen", "full"]
    frozen, full = result["strategies"]
    assert frozen["path"].startswith("cached-features") and frozen["pipeline_run_warm"] is not None
    assert full["path"] == "end-to-end" and full["pipeline_run_warm"] is None
    assert frozen["pipeline_epoch"]["n"] == measure.TIMED_EPOCHS - 1  # the first (tracing) epoch left out
    assert all(row["identical_to_first"] for row in result["forward"]["batches"])
    assert result["large_study"]["disk"]["full"] is None
    assert result["large_study"]["disk"]["frozen"]["shape"] == [1, 1, 512]
    assert set(result["large_study"]["study_cost"]) == {"frozen", "full"}
    tune = json.loads((out / "benchmark_tune.json").read_text())
    assert {row["variant"] for row in tune["rows"]} == {"frozen", "full"}
    max_epochs = load_params(params).train.max_epochs
    assert all(2 <= row["epochs_run"] <= 2 * max_epochs for row in tune["rows"])  # 2 trials under the rule
    document = (out / "benchmark.md").read_text()
    for heading in ("## Compute", "## Strategies", "## Tuning", "## A 32x32 study of 100 images"):
        assert heading in document


def test_report_renders_every_part_it_is_given():
    row = {"median": 2.0, "min": 1.0, "max": 3.0, "n": 2}
    numerics = {
        "date": "d",
        "commit": "c",
        "rows": [
            {"variant": "full", "option": "float32", "epoch": row, "max_val_accuracy_change": 0.0},
            {
                "variant": "full",
                "option": "mixed_bfloat16",
                "epoch": {**row, "median": 4.6},
                "max_val_accuracy_change": 0.1,
            },
        ],
    }
    tune = {
        "date": "d",
        "commit": "c",
        "rows": [{"variant": "frozen", "trials": 3, "epochs_run": 40, "seconds": 18.0, "trials_per_minute": 10.0}],
    }
    document = tables.render(None, None, numerics, tune)
    assert "| full | mixed_bfloat16 | 4.60 [1.00, 3.00] | 2.30x | 0.100 |" in document
    assert "| frozen | 3 | 40 | 18 | 10.0 |" in document
    assert "## Strategies" not in document  # parts that were not measured are left out, not faked


def _trial(curve: list[float], value: float) -> dict:
    return {"curve": dict(enumerate(curve, 1)), "value": value, "epochs": len(curve), "learning_rate": 1e-3}


def test_halving_replay_cuts_low_trials_at_the_rung_and_counts_what_it_saves():
    from pipeline.tools.bench.halving import at_rung

    trials = [
        _trial([0.5, 0.6, 0.7, 0.7], 0.7),
        _trial([0.2, 0.3, 0.8, 0.8, 0.8], 0.8),  # slow starter, best at the end
        _trial([0.6, 0.65, 0.66, 0.66], 0.66),
        _trial([0.1, 0.1], 0.1),  # stopped before rung 3: never cut there
    ]
    early = at_rung(trials, 1, 2)
    assert early["cut"] == [1, 3]  # 0.2 < 0.5 (top 1 of 2); 0.1 is third of 4 (top 2)
    assert early["best_cut"] and early["regret"] == pytest.approx(0.8 - 0.7)
    assert early["epochs_unpruned"] == 4 + 5 + 4 + 2 and early["epochs_pruned"] == 4 + 1 + 4 + 1
    assert at_rung(trials, 2, 2)["cut"] == [1]  # trial 3 stopped at epoch 2 by its rule: complete, not cut
    late = at_rung(trials, 3, 2)
    assert late["cut"] == [2] and not late["best_cut"] and late["regret"] == 0.0  # 0.66 below 0.7 and 0.8
    assert late["reached"] == 3 and late["spearman"] == pytest.approx(1.0)


def test_tuning_noise_spread_is_the_learning_rate_ratio_and_paired_test_difference():
    import numpy as np

    from pipeline.tools.bench.tuning_noise import spread

    rows = {
        "a": {"learning_rate": 1e-4, "head_units": 0, "test_accuracy": 0.70},
        "b": {"learning_rate": 4e-4, "head_units": 64, "test_accuracy": 0.72},
    }
    first = np.zeros((2, 100))
    first[:, :70] = 1
    second = first.copy()
    second[:, 70:72] = 1  # the same images right, plus two more on both seeds
    out = spread(rows, [first, second])
    assert out["learning_rate_ratio"] == pytest.approx(4.0) and out["head_units"] == [0, 64]
    assert out["test_accuracy_range"] == pytest.approx(0.02)
    assert out["paired_difference"]["mean"] == pytest.approx(0.02)


@pytest.mark.slow  # a benchmark process (~25 s), like the one above
def test_bench_times_the_parameter_efficient_studys_strategies_like_the_main_ones(tmp_path):
    strategies = {
        "bias_only": {"trainable": "all", "parameters": "bias"},
        "lora_block5": {"trainable": ["block5"], "parameters": "lora", "lora_rank": 2},
    }
    params, prepared = make_tiny_project(tmp_path, {"frozen": {"trainable": "none"}})
    raw = yaml.safe_load(params.read_text())
    raw["studies"]["parameter_efficient"]["strategies"] = strategies  # these two only, not the committed ones
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "reports"
    options = ["--params", str(params), "--prepared", str(prepared), "--out", str(out), "--parameter-efficient"]
    proc = run_stage("tools.bench", *options, env=stage_env(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "benchmark_parameter_efficient.json").read_text())["strategies"]
    assert {row["variant"]: row["path"] for row in rows} == {
        "bias_only": "end-to-end",  # block1's biases train: nothing below them to cache
        "lora_block5": "cached-features (cut after block4_pool)",
    }
    document = (out / "benchmark.md").read_text()
    assert "## Beyond layer freezing: the study's strategies, timed the same way" in document
    assert "| bias_only | end-to-end |" in document
