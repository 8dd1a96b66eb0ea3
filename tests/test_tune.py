"""The tune stage: budget accounting, resume after an interrupt, several workers on one study."""

from __future__ import annotations

import csv
import json
import signal
import subprocess

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pipeline.core.params import load_params
from pipeline.runtime.errors import PipelineError
from pipeline.stack import optuna_study
from pipeline.stack.optuna_outputs import best_params
from pipeline.stages.tune import study_identity
from tests.conftest import REPO, cli, make_tiny_project, run_stage, stage_command, stage_env

FROZEN = {"frozen": {"trainable": "none"}}


def _tune_args(root, params_path, variant="frozen") -> list:
    return [
        "--variant",
        variant,
        "--params",
        params_path,
        "--prepared",
        root / "prepared",
        "--out",
        root / "tune" / variant,
        "--feature-cache",
        root / "cache",
    ]


def _run_tune(root, params_path) -> subprocess.CompletedProcess:
    return run_stage("tune", *_tune_args(root, params_path), env=stage_env(root))


def _tune_command(root, params_path, variant="frozen"):
    return stage_command("tune", *_tune_args(root, params_path, variant))


def _study(root, variant="frozen"):
    storage = optuna_study.open_storage("journal", root / "tune" / variant / "study.journal", heartbeat_seconds=1)
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(storage=storage, study_name=summary.study_name)


def test_split_quota_is_exact_and_even():
    assert optuna_study.split_quota(7, 3) == [3, 2, 2]
    assert optuna_study.split_quota(2, 4) == [1, 1]
    assert optuna_study.split_quota(0, 2) == []
    assert sum(optuna_study.split_quota(13, 5)) == 13


def test_study_identity_ignores_n_trials_so_raising_it_continues_the_study(default_raw_params):
    from pipeline.core.params import parse_params
    from tests.conftest import merge

    base = parse_params(default_raw_params)
    more = parse_params(merge(default_raw_params, {"tune": {"n_trials": 50}}))
    other_rule = parse_params(merge(default_raw_params, {"train": {"patience": 3}}))
    other_seeds = parse_params(merge(default_raw_params, {"train": {"seeds": [7]}}))
    name = lambda p: optuna_study.study_name("frozen", study_identity(p, "frozen", "w", "d"))  # noqa: E731
    assert name(base) == name(more) == name(other_seeds)  # train seeds do not touch a trial
    assert name(base) != name(other_rule)  # the training rule does


def test_study_identity_holds_every_field_of_the_run_configuration_but_the_trials_own(default_raw_params):
    """Derived from RunConfig itself: a field added there is part of the identity without an edit here,
    so a changed setting can never resume a finished study."""
    import dataclasses

    from pipeline.core.fit import RunConfig
    from pipeline.core.params import parse_params
    from tests.conftest import merge

    params = parse_params(default_raw_params)
    identity = study_identity(params, "partial", "w", "d")
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(identity["run"]) == fields - {"head_units", "learning_rate", "num_classes"}
    assert identity["run"]["trainable_layers"] == sorted(params.variant("partial").layers)
    name = lambda p: optuna_study.study_name("partial", study_identity(p, "partial", "w", "d"))  # noqa: E731
    for change in ({"model": {"head_norm": "none"}}, {"train": {"augmentation": True}}, {"seed": 7}):
        assert name(parse_params(merge(default_raw_params, change))) != name(params), change


def _trial(number, state, value=None, attrs=None):
    return optuna.trial.create_trial(
        state=state,
        value=value,
        params={"head_units": 0, "learning_rate": 1e-3},
        distributions={
            "head_units": optuna.distributions.CategoricalDistribution([0, 8]),
            "learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True),
        },
        user_attrs=attrs or {},
        intermediate_values={} if state != TrialState.PRUNED else {1: 0.1},
    )


def test_budget_places_are_distinct_for_simultaneous_trials_and_a_failed_place_is_taken_again():
    def trial(number, state, place=None, **attrs):
        frozen = _trial(number, state, 0.5 if state == TrialState.COMPLETE else None, attrs)
        frozen.number = number
        if place is not None:
            frozen.user_attrs[optuna_study.BUDGET_INDEX] = place
        return frozen

    done = [trial(0, TrialState.COMPLETE, 0), trial(1, TrialState.COMPLETE, 1)]
    # two workers created trials 2 and 3 at the same moment: whichever looks first, 2 gets place 2
    both_new = [*done, trial(2, TrialState.RUNNING), trial(3, TrialState.RUNNING)]
    assert (optuna_study.budget_place(both_new, 2), optuna_study.budget_place(both_new, 3)) == (2, 3)
    three_took_its_place = [*done, trial(2, TrialState.RUNNING), trial(3, TrialState.RUNNING, 3)]
    assert optuna_study.budget_place(three_took_its_place, 2) == 2
    two_took_its_place = [*done, trial(2, TrialState.RUNNING, 2), trial(3, TrialState.RUNNING)]
    assert optuna_study.budget_place(two_took_its_place, 3) == 3
    # the worker of place 2 died (its trial FAIL, not by its own fault): the next trial takes place 2
    after_failure = [
        *done,
        trial(2, TrialState.FAIL, 2),
        trial(3, TrialState.COMPLETE, 3),
        trial(4, TrialState.RUNNING),
    ]
    assert optuna_study.budget_place(after_failure, 4) == 2
    # a NaN trial used its place up
    nan = [*done, trial(2, TrialState.FAIL, 2, **{optuna_study.FAILED_ON_ITS_OWN: "nan"}), trial(3, TrialState.RUNNING)]
    assert optuna_study.budget_place(nan, 3) == 3


def test_interrupted_failures_do_not_count_against_the_budget():
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial(0, TrialState.COMPLETE, 0.5, {"epochs_run": 2}))
    study.add_trial(_trial(1, TrialState.PRUNED, None, {"epochs_run": 1}))
    study.add_trial(_trial(2, TrialState.FAIL, None, {optuna_study.FAILED_ON_ITS_OWN: "non-finite loss"}))
    study.add_trial(_trial(3, TrialState.FAIL))  # interrupted from outside: repeated next run
    assert [t.number for t in optuna_study.finished_trials(study)] == [0, 1, 2]


def test_best_params_records_budget_rule_and_edge(default_raw_params):
    from pipeline.core.params import parse_params

    params = parse_params(default_raw_params)
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial(0, TrialState.COMPLETE, 0.5, {"epochs_run": 12, "budget_index": 0}))
    study.add_trial(_trial(1, TrialState.FAIL, None, {optuna_study.FAILED_ON_ITS_OWN: "nan", "budget_index": 1}))
    best = best_params(study.trials, params, "frozen", "s", 500)
    assert best["value"] == 0.5 and best["trial"] == 0
    assert best["validation"] == {"images": 500, "standard_error": pytest.approx((0.5 * 0.5 / 500) ** 0.5)}
    assert best["budget"]["trials_run"] == 2 and best["budget"]["failed_trials"] == 1
    assert best["budget"]["epochs_run"] == 12 and best["budget"]["n_trials"] == params.tune.n_trials
    assert best["budget"]["rule"] == {
        "max_epochs": params.train.max_epochs,
        "patience": params.train.patience,
        "min_delta": params.train.min_delta,
    }
    assert best["search_space"]["learning_rate"] == list(params.tune.learning_rate_head_only)  # frozen: head only
    assert best["learning_rate_at_edge"] == "low"  # 1e-3 below frozen's range [2e-3, 2e-2]
    # the failed trial enters the tuning curve as 0.0: best of 1 is 0.25 on average, of 2 is 0.375
    assert best["tuning_curve"]["expected_best"] == pytest.approx([0.25, 0.375])
    assert best["tuning_curve"]["still_rising"] is True  # +0.125 > one validation image (0.002)
    with pytest.raises(PipelineError, match="none of 1 trials completed"):
        best_params([study.trials[1]], params, "frozen", "s", 500)


def test_learning_rate_edges_are_the_outer_tenths_of_the_log_range():
    from pipeline.stack.optuna_outputs import learning_rate_edge

    assert learning_rate_edge(1.1e-5, (1e-5, 1e-2)) == "low"
    assert learning_rate_edge(9e-3, (1e-5, 1e-2)) == "high"
    assert learning_rate_edge(2e-5, (1e-5, 1e-2)) is None  # 10% of 3 decades = 0.3 decades
    assert learning_rate_edge(1e-3, (1e-5, 1e-2)) is None


def test_start_up_design_covers_the_range_and_differs_per_strategy():
    points = optuna_study.design(42, "frozen", [0, 64, 256], (1e-5, 1e-2), 8)
    positions = (np.log10([p["learning_rate"] for p in points]) + 5) / 3  # 0..1 across the log range
    for k in range(2, 9):  # every prefix (a short budget uses the first points) spreads over the range
        ordered = np.sort(positions[:k])
        widest = np.diff(np.r_[ordered, ordered[0] + 1]).max()  # gaps on the circle
        assert widest <= 1.81 / k
    assert [p["head_units"] for p in points[:3]] in ([0, 64, 256], [64, 256, 0], [256, 0, 64])  # each in turn
    assert points[:3] == optuna_study.design(42, "frozen", [0, 64, 256], (1e-5, 1e-2), 3)  # prefix-stable, seeded
    assert points != optuna_study.design(42, "partial", [0, 64, 256], (1e-5, 1e-2), 8)


def test_head_only_strategies_search_their_own_learning_rate_range(default_raw_params):
    from pipeline.core.params import parse_params

    params = parse_params(default_raw_params)
    end_to_end = {v for v in params.variants if params.trains_end_to_end(v)}
    assert end_to_end == {"scratch", "full"}  # every other strategy has a frozen prefix to cache
    ranges = {v: params.learning_rate_range(v) for v in params.variants}
    head_only = {"frozen", "cut2_frozen", "cut3_frozen", "cut4_frozen"}
    assert {v for v in params.variants if params.learning_rate_key(v) == "tune.learning_rate_head_only"} == head_only
    assert {ranges[v] for v in set(params.variants) - head_only} == {tuple(params.tune.learning_rate)}
    # a head-only range is the shared one times 512 / the head's input (32x32: 512 after block5,
    # 2,048 / 4,096 / 8,192 flattened after block4 / 3 / 2): the logits move at one speed per step
    low, high = params.tune.learning_rate_head_only
    assert params.data.image_size == 32 and params.tune.head_only_reference_features == 512
    assert ranges["frozen"] == (low, high)  # exactly: the whole base's head is the reference
    for variant, features in (("cut4_frozen", 2048), ("cut3_frozen", 4096), ("cut2_frozen", 8192)):
        assert ranges[variant] == pytest.approx((low * 512 / features, high * 512 / features), rel=1e-12)
    depth0, name = params.with_depth(0)
    assert depth0.learning_rate_range(name) == (low, high)
    cut3_depth0, name = params.with_depth(0, "block3")
    assert cut3_depth0.learning_rate_range(name) == ranges["cut3_frozen"]
    # global average pooling: block3's head reads 256 channels, so its range is twice the shared one
    gap = parse_params({**default_raw_params, "model": {**default_raw_params["model"], "pooling": "gap"}})
    assert gap.learning_rate_range("cut3_frozen") == pytest.approx((2 * low, 2 * high), rel=1e-12)
    # 0 turns the scaling off: every head-only strategy searches the shared range
    raw = {**default_raw_params, "tune": {**default_raw_params["tune"], "head_only_reference_features": 0}}
    assert parse_params(raw).learning_rate_range("cut2_frozen") == (low, high)
    assert len(params.train.seeds) >= 5 and params.data.val_per_class >= 50


@pytest.mark.parametrize(
    ("value", "others", "factor", "cut"),
    [
        (0.5, [], 3, False),  # the first trial at the rung always continues
        (0.5, [0.6], 3, True),  # 2 trials: top ceil(2/3) = 1 continues
        (0.6, [0.6], 3, False),  # a tie keeps the trial
        (0.5, [0.6, 0.4, 0.3], 3, False),  # 4 trials: top 2 continue, 0.5 is second
        (0.4, [0.6, 0.5, 0.3], 3, True),
        (0.4, [0.6, 0.5, 0.3, 0.2, 0.1], 2, False),  # halving: top 3 of 6, 0.4 is third
        (0.1, [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], 3, True),  # 8 trials: top 3 continue
        (0.75, [0.2, 0.3, 0.4, 0.5, 0.7, 0.8, 0.9], 3, False),  # third of 8: continues
    ],
)
def test_halving_keeps_the_top_share_of_the_trials_at_the_rung(value, others, factor, cut):
    assert optuna_study.halving_cuts(value, others, factor) is cut


def test_halving_pruner_decides_only_at_its_rung_within_one_study():
    pruner = optuna_study.HalvingPruner(rung=2, factor=2)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for value in (0.7, 0.6):  # two finished trials reached the rung with these values
        trial = study.ask()
        trial.report(0.1, 1)
        trial.report(value, 2)
        study.tell(trial, value)
    low = study.ask()
    low.report(0.9, 1)
    assert not low.should_prune()  # epoch 1: before the rung, whatever the value
    low.report(0.5, 2)
    assert low.should_prune()  # 3 trials at the rung: top ceil(3/2) = 2 continue, 0.5 is third
    high = study.ask()
    high.report(0.65, 2)
    assert not high.should_prune()  # second of the three at the rung (low is still running): continues
    high.report(0.1, 3)
    assert not high.should_prune()  # after the rung nothing is cut
    assert not optuna_study.HalvingPruner(rung=0, factor=2).prune(study, study.trials[2])  # 0: off


@pytest.mark.slow  # tune stage processes: 15-40 s
def test_tune_stage_writes_outputs_and_nested_mlflow_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    # without the feature cache `frozen` trains end to end: its study halves (cached ones never do)
    halving = {"tune": {"halving_epoch": 1, "halving_factor": 2}, "train": {"cache_features": False}}
    params_path, _ = make_tiny_project(tmp_path, FROZEN, halving)
    result = _run_tune(tmp_path, params_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("[tune/frozen] trial ") == 3
    out = tmp_path / "tune" / "frozen"
    best = json.loads((out / "best_params.json").read_text())
    low, high = load_params(params_path).tune.learning_rate_head_only
    assert best["head_units"] in (0, 8) and low <= best["learning_rate"] <= high
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["trial"] for r in rows] == ["0", "1", "2"]
    # the halving decisions replay from the recorded values at the rung, in budget order
    at_rung = [float(r["rung_value"]) for r in rows]
    for k, row in enumerate(rows):
        cut = optuna_study.halving_cuts(at_rung[k], at_rung[:k], 2)
        assert row["state"] == ("PRUNED" if cut else "COMPLETE")
        assert int(row["epochs_run"]) == (1 if cut else 2)
    assert best["budget"]["pruned_trials"] == sum(r["state"] == "PRUNED" for r in rows)
    assert (out / "figures" / "optimization_history.png").stat().st_size > 1000
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("vgg16-freezing")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "tune/frozen"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == [f"tune/frozen/trial-{i}" for i in range(3)]
    assert {r.data.tags["state"] for r in children} <= {"COMPLETE", "PRUNED"}
    assert parent.data.metrics["tuning/best_value"] == pytest.approx(best["value"])
    curve = client.get_metric_history(parent.info.run_id, "tuning/expected_best_val_accuracy")
    assert [(m.step, m.value) for m in curve] == [
        (n, pytest.approx(v)) for n, v in enumerate(best["tuning_curve"]["expected_best"], 1)
    ]
    # the train stage reads them
    from pipeline.stages.train import hyperparameters

    hyper = hyperparameters(load_params(params_path), out / "best_params.json")
    assert hyper == {"head_units": best["head_units"], "learning_rate": best["learning_rate"], "source": "tuned"}


def _deterministic(root, variant="frozen"):
    """trials.csv without wall-clock columns, and best_params.json."""
    out = root / "tune" / variant
    rows = [
        {k: v for k, v in row.items() if k not in ("seconds", "train_seconds")}
        for row in csv.DictReader((out / "trials.csv").open())
    ]
    return rows, json.loads((out / "best_params.json").read_text())


@pytest.mark.slow  # tune stage processes: 15-40 s
def test_interrupted_then_resumed_study_equals_an_uninterrupted_one(tmp_path):
    override = {
        "tune": {"n_trials": 4, "startup_trials": 2, "halving_epoch": 1, "halving_factor": 2},  # cuts replay too
        "train": {"max_epochs": 3, "patience": 2, "cache_features": False},  # end to end: halving applies
    }
    clean_root, resumed_root = tmp_path / "clean", tmp_path / "resumed"
    params_path, _ = make_tiny_project(clean_root, FROZEN, override)
    assert _run_tune(clean_root, params_path).returncode == 0

    params_path, _ = make_tiny_project(resumed_root, FROZEN, override)
    process = subprocess.Popen(
        _tune_command(resumed_root, params_path),
        cwd=REPO,
        env=stage_env(resumed_root),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in process.stdout:  # trial 0 done, trial 1 running: interrupt mid-trial
        if "[tune/frozen] trial 0:" in line:
            process.send_signal(signal.SIGTERM)
            break
    assert process.wait(timeout=120) != 0
    first = _study(resumed_root)
    kept = {t.number: t.datetime_start for t in optuna_study.finished_trials(first)}
    assert 1 <= len(kept) < 4
    assert not (resumed_root / "tune" / "frozen" / "best_params.json").exists()

    result = _run_tune(resumed_root, params_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(kept)} trials done, {4 - len(kept)} to run" in result.stdout
    resumed = _study(resumed_root)
    assert len(optuna_study.finished_trials(resumed)) == 4
    assert all(t.datetime_start == kept[t.number] for t in optuna_study.finished_trials(resumed) if t.number in kept)
    # the same trials (parameters, values, epochs) and the same best parameters as the clean study
    assert _deterministic(resumed_root) == _deterministic(clean_root)
    # and MLflow shows the interrupted study run as KILLED, not RUNNING
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{resumed_root}/mlflow.db")
    experiment = client.get_experiment_by_name("vgg16-freezing")
    statuses = sorted(
        r.info.status for r in client.search_runs([experiment.experiment_id], "attributes.run_name = 'tune/frozen'")
    )
    assert statuses == ["FINISHED", "KILLED"]


@pytest.mark.slow  # tune stage processes: 15-40 s
def test_a_tune_trial_and_a_train_run_follow_the_same_rule(tmp_path):
    """One trial at the design point, then the train stage with the chosen parameters and the
    tune seed: the same epochs, the same kept epoch, the same validation accuracy."""
    override = {"tune": {"n_trials": 1, "startup_trials": 1}, "train": {"max_epochs": 8, "patience": 2}}
    params_path, prepared = make_tiny_project(tmp_path, FROZEN, override)
    raw = yaml.safe_load(params_path.read_text())
    raw["train"]["seeds"] = [raw["seed"]]
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert _run_tune(tmp_path, params_path).returncode == 0
    (trial,) = list(csv.DictReader((tmp_path / "tune" / "frozen" / "trials.csv").open()))
    best = tmp_path / "tune" / "frozen" / "best_params.json"
    options = cli(
        variant="frozen",
        params=params_path,
        prepared=prepared,
        best_params=best,
        out=tmp_path / "train",
        feature_cache=tmp_path / "cache",
    )
    train = run_stage("train", *options, env=stage_env(tmp_path))
    assert train.returncode == 0, train.stderr[-3000:]
    seed = json.loads((tmp_path / "train" / "seeds" / str(raw["seed"]) / "metrics.json").read_text())
    assert (seed["epochs_run"], seed["best_epoch"]) == (int(trial["epochs_run"]), int(trial["best_epoch"]))
    assert seed["best_val_accuracy"] == pytest.approx(float(trial["value"]), abs=1e-7)
    assert seed["max_epochs"] == 8 and seed["patience"] == 2


@pytest.mark.slow  # tune stage processes: 15-40 s
def test_two_worker_processes_share_one_journal_without_losing_or_duplicating_trials(tmp_path):
    params_path, _ = make_tiny_project(tmp_path, FROZEN, {"tune": {"n_trials": 4, "n_workers": 2}})
    result = _run_tune(tmp_path, params_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(tmp_path)
    counted = optuna_study.finished_trials(study)
    assert sorted(t.user_attrs[optuna_study.BUDGET_INDEX] for t in counted) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in counted)
    assert len({t.user_attrs["worker_pid"] for t in counted}) == 2
    # a trial asked for just as the other worker took the last place is marked, failed and never trains
    others = [t for t in study.trials if t not in counted]
    assert all(t.user_attrs.get(optuna_study.OVER_BUDGET) and "epochs_run" not in t.user_attrs for t in others)
    rows = list(csv.DictReader((tmp_path / "tune" / "frozen" / "trials.csv").open()))
    assert [int(row["trial"]) for row in rows] == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_long_study_runs_in_successive_processes_without_losing_trials(tmp_path):
    """trials_per_process bounds the memory Keras keeps per trained model: 3 trials, 2 per process."""
    params_path, _ = make_tiny_project(tmp_path, FROZEN, {"tune": {"n_trials": 3, "trials_per_process": 2}})
    result = _run_tune(tmp_path, params_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(tmp_path)
    assert sorted(t.number for t in study.trials) == [0, 1, 2]
    pids = [t.user_attrs["worker_pid"] for t in sorted(study.trials, key=lambda t: t.number)]
    assert pids[0] == pids[1] != pids[2]  # 2 trials in the first process, 1 in the second
    assert json.loads((tmp_path / "tune" / "frozen" / "best_params.json").read_text())["budget"]["trials_run"] == 3
