"""Interruption of the train stage by a real signal, and a real `mlflow server` over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.stack import team_stack
from tests.conftest import REPO, as_from_a_terminal, cli, make_tiny_project, stage_command, stage_env

FULL = {"full": {"trainable": "all"}}

pytestmark = pytest.mark.slow  # about 75 s together; CI runs them with `make test-slow`


def _train_command(root: Path, params: Path, variant: str) -> list[str]:
    return stage_command(
        "train",
        *cli(
            variant=variant,
            params=params,
            prepared=root / "prepared",
            out=root / "results" / variant,
            feature_cache=root / "cache",
        ),
    )


def test_sigint_during_the_second_seed_keeps_the_previous_results_and_ends_runs_honestly(tmp_path):
    params, _ = make_tiny_project(tmp_path, FULL, {"train": {"max_epochs": 6, "patience": 6, "seeds": [1, 2]}})
    out = tmp_path / "results" / "full"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text('{"from": "the previous complete run"}\n')
    env = {**stage_env(tmp_path), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        _train_command(tmp_path, params, "full"),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_from_a_terminal,
    )
    seen = []
    for line in process.stdout:  # interrupt once seed 2 has finished its first epoch (of 6)
        seen.append(line)
        if line.startswith("[train/full/seed-2] epoch 1/"):  # the stage's one progress line per epoch
            process.send_signal(signal.SIGINT)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, "".join(seen)[-3000:] + stderr[-3000:]
    assert "interrupted: outputs of this stage were not written" in stderr
    assert "[train/full/seed-1] test accuracy" in "".join(seen)
    # the earlier output is untouched and nothing half-written lies beside it
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
    assert json.loads((out / "metrics.json").read_text()) == {"from": "the previous complete run"}
    assert [p.name for p in out.parent.iterdir()] == ["full"]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("vgg16-freezing")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert runs["train/full/seed-1"].info.status == "FINISHED"
    assert runs["train/full/seed-2"].info.status == "KILLED"
    assert runs["train/full/seed-2"].data.tags["failure_reason"].startswith("interrupted")
    history = client.get_metric_history(runs["train/full/seed-2"].info.run_id, "curves/val_accuracy")
    assert [m.step for m in history][:1] == [1]  # the epochs before the signal stay recorded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with a SQLite store and proxied artifacts in `tmp_path` (the
    team stack's own start-up, on SQLite instead of PostgreSQL)."""
    port = _free_port()
    log = tmp_path / "mlflow-server.log"
    server = team_stack.start_mlflow_server(
        f"sqlite:///{tmp_path}/server.db", tmp_path / "art", port, log, dict(os.environ)
    )
    yield f"http://127.0.0.1:{port}", tmp_path / "art"
    team_stack.stop_process(server.pid)


def test_train_stage_logs_to_a_real_mlflow_server_over_http(tmp_path, mlflow_server):
    uri, artifact_root = mlflow_server
    project = tmp_path / "project"
    params, _ = make_tiny_project(project, {"frozen": {"trainable": "none"}}, {"train": {"seeds": [1]}})
    env = {**stage_env(project), "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run(
        _train_command(project, params, "frozen"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vgg16-freezing")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "train/frozen/seed-1"
    assert run.info.status == "FINISHED"
    seed_metrics = json.loads((project / "results" / "frozen" / "seeds" / "1" / "metrics.json").read_text())
    assert run.data.metrics["evaluation/test_accuracy"] == pytest.approx(seed_metrics["test_accuracy"])
    assert run.data.metrics["parameters/trainable"] == seed_metrics["parameters"]["trainable"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "curves/val_accuracy")] == [1, 2]
    assert run.data.params["trainable"] == "none"
    assert run.data.tags["mlflow.source.name"] == "pipeline/stages/train.py"
    # artifacts went through the server into its artifact destination, not a local ./mlruns
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "history.csv", "confusion_matrix.png", "model_summary.txt"} <= names
    assert list(artifact_root.rglob("history.csv"))
