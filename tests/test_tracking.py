"""The MLflow module: URI resolution, fail-fast on a dead server, run status on failure."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.stack import tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.connect(uri, "test-experiment")
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)


def test_relative_sqlite_uri_resolves_against_dvc_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert tracking.resolve_tracking_uri("sqlite:///mlflow.db", "/elsewhere") == f"sqlite:///{tmp_path}/repo/mlflow.db"
    monkeypatch.delenv("DVC_ROOT")
    assert tracking.resolve_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.resolve_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"


def test_environment_variable_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_tracking_uri("sqlite:///mlflow.db", "/repo") == "http://127.0.0.1:5999"


def test_unreachable_server_fails_fast_naming_the_uri():
    with pytest.raises(tracking.TrackingError, match=r"http://127\.0\.0\.1:9/ is not reachable"):
        tracking.connect("http://127.0.0.1:9/", "x")  # port 9 (discard): nothing listens


def _only_run(client, name):
    (experiment,) = [e for e in client.search_experiments() if e.name == "test-experiment"]
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
    assert len(runs) == 1
    return runs[0]


def test_run_logs_flattened_params_tags_and_per_epoch_metrics(store):
    with tracking.run("r1", tags={"variant": "frozen", "skipped": None}, params={"train": {"epochs": 3}, "seed": 1}):
        for epoch in (1, 2, 3):
            tracking.log_metrics({"val_accuracy": 0.1 * epoch}, step=epoch)
        tracking.log_metrics({"nested": {"value": 2}, "label": "text", "none": None})
    run = _only_run(store, "r1")
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.epochs": "3", "seed": "1"}
    assert run.data.tags["variant"] == "frozen" and "skipped" not in run.data.tags
    history = store.get_metric_history(run.info.run_id, "val_accuracy")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert run.data.metrics["nested.value"] == 2.0 and "label" not in run.data.metrics


def test_exception_ends_the_run_failed(store):
    with pytest.raises(ValueError), tracking.run("r2", tags={}):
        raise ValueError("boom")
    assert _only_run(store, "r2").info.status == "FAILED"
    assert mlflow.active_run() is None


def test_interrupt_ends_the_run_killed(store):
    with pytest.raises(KeyboardInterrupt), tracking.run("r3", tags={}):
        raise KeyboardInterrupt
    assert _only_run(store, "r3").info.status == "KILLED"


def test_sqlite_experiment_keeps_artifacts_beside_the_database(store, tmp_path):
    experiment = mlflow.get_experiment_by_name("test-experiment")
    assert experiment.artifact_location == (tmp_path / "mlruns").as_uri()
