"""The tune stage: budget accounting, resume after an interrupt, several workers on one study."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from pipeline import study as studies
from pipeline.errors import PipelineError
from pipeline.params import load_params
from pipeline.tune import study_identity
from pipeline.tune_outputs import best_params
from tests.conftest import REPO, make_tiny_project, stage_env

FROZEN = {"frozen": {"trainable": "none"}}


def _run_tune(root, params_path) -> subprocess.CompletedProcess:
    return subprocess.run(_tune_command(root, params_path), cwd=REPO, env=stage_env(root), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def _tune_command(root, params_path, variant="frozen"):
    return [sys.executable, "-m", "pipeline.tune", "--variant", variant, "--params", str(params_path),
            "--prepared", str(root / "prepared"), "--out", str(root / "tune" / variant),
            "--feature-cache", str(root / "cache")]  # fmt: skip


def _study(root, variant="frozen"):
    storage = studies.open_storage("journal", root / "tune" / variant / "study.journal")
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(storage=storage, study_name=summary.study_name)


def test_split_quota_is_exact_and_even():
    assert studies.split_quota(7, 3) == [3, 2, 2]
    assert studies.split_quota(2, 4) == [1, 1]
    assert studies.split_quota(0, 2) == []
    assert sum(studies.split_quota(13, 5)) == 13


def test_study_identity_ignores_n_trials_so_raising_it_continues_the_study(default_raw_params):
    from pipeline.params import parse_params
    from tests.conftest import merge

    base = parse_params(default_raw_params)
    more = parse_params(merge(default_raw_params, {"tune": {"n_trials": 50}}))
    other_epochs = parse_params(merge(default_raw_params, {"tune": {"epochs": 9}}))
    name = lambda p: studies.study_name("frozen", study_identity(p, "frozen", "w", "d"))  # noqa: E731
    assert name(base) == name(more)
    assert name(base) != name(other_epochs)


def _trial(number, state, value=None, attrs=None):
    return optuna.trial.create_trial(
        state=state, value=value, params={"head_units": 0, "learning_rate": 1e-3},
        distributions={"head_units": optuna.distributions.CategoricalDistribution([0, 8]),
                       "learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)},
        user_attrs=attrs or {}, intermediate_values={} if state != TrialState.PRUNED else {1: 0.1},
    )  # fmt: skip


def test_interrupted_failures_do_not_count_against_the_budget():
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial(0, TrialState.COMPLETE, 0.5, {"epochs_run": 2}))
    study.add_trial(_trial(1, TrialState.PRUNED, None, {"epochs_run": 1}))
    study.add_trial(_trial(2, TrialState.FAIL, None, {studies.FAILED_ON_ITS_OWN: "non-finite loss"}))
    study.add_trial(_trial(3, TrialState.FAIL))  # interrupted from outside: repeated next run
    assert [t.number for t in studies.finished_trials(study)] == [0, 1, 2]


def test_best_params_records_budget_and_pruning(default_raw_params):
    from pipeline.params import parse_params

    tune = parse_params(default_raw_params).tune
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial(0, TrialState.COMPLETE, 0.5, {"epochs_run": tune.epochs}))
    study.add_trial(_trial(1, TrialState.PRUNED, None, {"epochs_run": 1}))
    best = best_params(study.trials, tune, "frozen", "s")
    assert best["value"] == 0.5 and best["trial"] == 0
    assert best["pruning"]["pruned_trials"] == 1
    assert best["pruning"]["epochs_saved"] == tune.epochs - 1
    assert best["budget"]["rule"] == "the same for every strategy"
    with pytest.raises(PipelineError, match="none of 1 trials completed"):
        best_params([study.trials[1]], tune, "frozen", "s")


def test_tune_stage_writes_outputs_and_nested_mlflow_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    params_path, _ = make_tiny_project(tmp_path, FROZEN)
    result = _run_tune(tmp_path, params_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("[tune/frozen] trial ") == 3
    out = tmp_path / "tune" / "frozen"
    best = json.loads((out / "best_params.json").read_text())
    assert best["head_units"] in (0, 8) and 1e-5 <= best["learning_rate"] <= 1e-2
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    assert (out / "figures" / "optimization_history.png").stat().st_size > 1000
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("vgg16-freezing")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "tune/frozen"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == [f"tune/frozen/trial-{i}" for i in range(3)]
    assert {r.data.tags["state"] for r in children} <= {"COMPLETE", "PRUNED"}
    assert parent.data.metrics["best_value"] == pytest.approx(best["value"])
    # the train stage reads them
    from pipeline.train import hyperparameters

    hyper = hyperparameters(load_params(params_path), out / "best_params.json")
    assert hyper == {"head_units": best["head_units"], "learning_rate": best["learning_rate"], "source": "tuned"}


def test_interrupted_study_resumes_with_only_the_missing_trials(tmp_path):
    params_path, _ = make_tiny_project(tmp_path, FROZEN, {"tune": {"n_trials": 4}})
    process = subprocess.Popen(_tune_command(tmp_path, params_path), cwd=REPO, env=stage_env(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    for line in process.stdout:  # wait until one trial has finished, then interrupt mid-study
        if "[tune/frozen] trial 0:" in line:
            process.send_signal(signal.SIGTERM)
            break
    assert process.wait(timeout=120) != 0
    first = _study(tmp_path)
    kept = {t.number: t.datetime_start for t in studies.finished_trials(first)}
    assert 1 <= len(kept) < 4
    assert not (tmp_path / "tune" / "frozen" / "best_params.json").exists()

    result = _run_tune(tmp_path, params_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(kept)} trials done, {4 - len(kept)} to run" in result.stdout
    assert result.stdout.count("[tune/frozen] trial ") == 4 - len(kept)
    resumed = _study(tmp_path)
    finished = studies.finished_trials(resumed)
    assert len(finished) == 4
    assert all(t.datetime_start == kept[t.number] for t in finished if t.number in kept)  # not rerun
    # and MLflow shows the interrupted study run as KILLED, not RUNNING
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("vgg16-freezing")
    statuses = sorted(
        r.info.status for r in client.search_runs([experiment.experiment_id], "attributes.run_name = 'tune/frozen'")
    )
    assert statuses == ["FINISHED", "KILLED"]


def test_two_worker_processes_share_one_journal_without_losing_or_duplicating_trials(tmp_path):
    params_path, _ = make_tiny_project(tmp_path, FROZEN, {"tune": {"n_trials": 4, "n_workers": 2}})
    result = _run_tune(tmp_path, params_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(tmp_path)
    assert len(study.trials) == 4
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert len({t.user_attrs["worker_pid"] for t in study.trials}) == 2
    rows = list(csv.DictReader((tmp_path / "tune" / "frozen" / "trials.csv").open()))
    assert len(rows) == 4


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
    assert json.loads((tmp_path / "tune" / "frozen" / "best_params.json").read_text())["pruning"]["trials"] == 3
