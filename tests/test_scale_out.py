"""README "Running on several machines" on real engines: Optuna workers on a PostgreSQL server,
the MLflow tracking server on PostgreSQL, and the team stack's up/down commands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.runtime.errors import PipelineError
from pipeline.stack import optuna_study, team_stack
from tests.conftest import REPO, cli, make_tiny_project, run_stage, stage_command

pytestmark = pytest.mark.slow  # real servers and stage processes: about 2 minutes together

PASSWORD = "s3cret-for-the-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bindir() -> Path:
    """Debian's PostgreSQL programs; skips without them, fails under REQUIRE_POSTGRES=1 (CI)."""
    try:
        return team_stack.find_bindir()
    except PipelineError as error:
        message = f"no PostgreSQL server programs on this machine: {error}"
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{message}; `make test` installs Debian's postgresql where apt is available")
        pytest.skip(message)


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL server (Debian's binaries) on 127.0.0.1, password authentication."""
    bindir = _postgres_bindir()
    root = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))  # not pytest's tmp: the server account must reach it
    root.chmod(0o755)
    server = team_stack.Postgres(root / "postgres", _free_port(), bindir)
    server.initialise(PASSWORD)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def _database(server: team_stack.Postgres, name: str) -> str:
    server.create_databases(PASSWORD, (name,))
    return server.url(name)


def _tune(machine: Path, *extra: str) -> list[str]:
    return stage_command(
        "tune",
        "--variant",
        "full",
        "--params",
        machine / "params.yaml",
        "--prepared",
        machine / "prepared",
        "--out",
        machine / "tune",
        "--feature-cache",
        machine / "cache",
        *extra,
    )


def test_tune_workers_on_three_machines_share_one_postgresql_study_and_survive_a_killed_worker(tmp_path, postgres):
    """A coordinator and two workers that share nothing but the database URL (each its own copy of
    the data, params, output and MLflow store); one worker is SIGKILLed mid-trial. The study ends
    with exactly its budget of trials, each place in the budget run once (the killed trial's place
    rerun by the others), and the coordinator's best_params.json is the
    study's best trial, which the train stage then reads."""
    url = _database(postgres, "optuna_workers")
    budget = 6
    override = {
        "tune": {"storage": url, "heartbeat_seconds": 1, "n_trials": budget, "startup_trials": 3},
        "train": {"max_epochs": 4, "patience": 4},  # every trial runs 4 epochs: a kill lands mid-trial
    }
    machines = [tmp_path / f"machine{i}" for i in range(3)]
    for machine in machines:
        make_tiny_project(machine, {"full": {"trainable": "all"}}, override)
    env = {**os.environ, "PGPASSWORD": PASSWORD}  # the credential travels in the environment only
    env.pop("DVC_ROOT", None)

    def start(machine: Path, *extra: str) -> subprocess.Popen:
        machine_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{machine}/mlflow.db"}
        return subprocess.Popen(
            _tune(machine, *extra),
            cwd=REPO,
            env=machine_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    coordinator = start(machines[0])
    opening = []
    for line in coordinator.stdout:  # the study exists (tables and study created) once it says so
        opening.append(line)
        if line.startswith("[tune/full] study full-"):
            break
    assert "0 trials done, 6 to run" in opening[-1], "".join(opening)[-3000:]
    survivor = start(machines[1], "--worker")
    victim = start(machines[2], "--worker")
    victim_log = []
    for line in victim.stdout:
        victim_log.append(line)
        if line.startswith("[tune/full/trial-") and " epoch 1/4" in line:
            os.killpg(victim.pid, signal.SIGKILL)  # a lost machine: no chance to mark its trial failed
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "".join(victim_log)[-3000:]
    survivor_out, _ = survivor.communicate(timeout=900)
    coordinator_out, _ = coordinator.communicate(timeout=900)
    assert survivor.returncode == 0, survivor_out[-3000:]
    assert coordinator.returncode == 0, coordinator_out[-3000:]

    best = json.loads((machines[0] / "tune" / "best_params.json").read_text())
    os.environ["PGPASSWORD"] = PASSWORD
    try:
        study = optuna.load_study(study_name=best["study"], storage=url)
        trials = study.get_trials(deepcopy=False)
    finally:
        del os.environ["PGPASSWORD"]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    place = optuna_study.BUDGET_INDEX
    assert sorted(t.user_attrs[place] for t in complete) == list(range(budget))  # none lost or twice
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    killed = [t for t in trials if t.user_attrs.get("worker_pid") == victim.pid and t.state != TrialState.COMPLETE]
    assert len(killed) == 1 and killed[0].state == TrialState.FAIL  # failed by the heartbeat, not by itself
    [rerun] = [t for t in complete if t.user_attrs[place] == killed[0].user_attrs[place]]
    assert rerun.user_attrs["worker_pid"] != victim.pid
    if killed[0].user_attrs[place] < 3:  # a design place is rerun with its design point (a TPE
        assert rerun.params == killed[0].params  # place is drawn again from the results known by then)
    over = [t for t in trials if t.user_attrs.get(optuna_study.OVER_BUDGET)]
    assert all("epochs_run" not in t.user_attrs for t in over)  # a trial that found no place never trained
    assert len(trials) == budget + 1 + len(over)
    workers = {t.user_attrs["worker_pid"] for t in complete}
    assert {coordinator.pid, survivor.pid} <= workers  # both survivors took part

    winner = max(complete, key=lambda t: (t.value, -t.user_attrs[optuna_study.BUDGET_INDEX]))
    assert (best["head_units"], best["learning_rate"], best["trial"]) == (
        winner.params["head_units"],
        winner.params["learning_rate"],
        winner.user_attrs[optuna_study.BUDGET_INDEX],
    )
    assert best["budget"]["trials_run"] == budget
    snapshot = optuna.load_study(
        study_name=best["study"],
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(machines[0] / "tune" / "study.journal"))
        ),
    )  # the DVC output: a copy of the database's study
    assert [(t.number, t.state, t.value, t.params) for t in snapshot.trials] == [
        (t.number, t.state, t.value, t.params) for t in trials
    ]
    rows = (machines[0] / "tune" / "trials.csv").read_text().splitlines()
    assert len(rows) == budget + 1 and all(",COMPLETE," in row for row in rows[1:])

    from pipeline.core.params import load_params
    from pipeline.stages.train import hyperparameters

    read = hyperparameters(load_params(machines[0] / "params.yaml"), machines[0] / "tune" / "best_params.json")
    assert (read["head_units"], read["learning_rate"]) == (winner.params["head_units"], winner.params["learning_rate"])


def test_train_stage_logs_to_an_mlflow_server_on_postgresql_with_served_artifacts(tmp_path, postgres):
    backend = _database(postgres, "mlflow_server")
    port = _free_port()
    server_env = {**os.environ, "PGPASSWORD": PASSWORD}
    server = team_stack.start_mlflow_server(backend, tmp_path / "artifacts", port, tmp_path / "mlflow.log", server_env)
    try:
        uri = f"http://127.0.0.1:{port}"
        project = tmp_path / "project"
        params, prepared = make_tiny_project(project, {"frozen": {"trainable": "none"}}, {"train": {"seeds": [1]}})
        out = project / "results" / "frozen"
        env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "PGPASSWORD", "PGPASSFILE")}
        env["MLFLOW_TRACKING_URI"] = uri  # the client talks HTTP only: no database credential
        proc = run_stage(
            "train",
            *cli(variant="frozen", params=params, prepared=prepared, out=out, feature_cache=project / "cache"),
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

        client = MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("vgg16-freezing").experiment_id])
        assert (run.info.run_name, run.info.status) == ("train/frozen/seed-1", "FINISHED")
        seed_metrics = json.loads((out / "seeds" / "1" / "metrics.json").read_text())
        assert run.data.metrics["evaluation/test_accuracy"] == pytest.approx(seed_metrics["test_accuracy"])
        assert run.data.metrics["parameters/trainable"] == seed_metrics["parameters"]["trainable"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "curves/val_accuracy")] == [1, 2]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the server, not a local path
        local = client.download_artifacts(run.info.run_id, "history.csv", str(tmp_path / "download"))
        assert Path(local).read_bytes() == (out / "seeds" / "1" / "history.csv").read_bytes()
        assert list((tmp_path / "artifacts").rglob("history.csv"))  # stored in the server's destination

        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=postgres.port, user=team_stack.USER, password=PASSWORD, dbname="mlflow_server"
        ) as connection:
            names = [row[0] for row in connection.execute("SELECT name FROM runs")]
        assert names == ["train/frozen/seed-1"]  # the runs live in PostgreSQL
    finally:
        team_stack.stop_process(server.pid)


def test_team_stack_up_then_down(tmp_path):
    """`make team-up` / `make team-down`: PostgreSQL and MLflow on 127.0.0.1, the environment in
    .team/env (password in a mode-600 pgpass file, nowhere else), idempotent up, clean down."""
    _postgres_bindir()
    root = Path(tempfile.mkdtemp(prefix="pipeline-team-"))
    root.chmod(0o755)
    pg_port, mlflow_port = _free_port(), _free_port()
    command = [
        sys.executable,
        "-m",
        "pipeline.stack.team_stack",
        "--dir",
        str(root / "team"),
        "--pg-port",
        str(pg_port),
        "--mlflow-port",
        str(mlflow_port),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", "PGPASSFILE", "MLFLOW_TRACKING_URI")}
    try:
        for _ in range(2):  # the second `up` finds both running
            up = subprocess.run(
                [*command[:3], "up", *command[3:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
            )
            assert up.returncode == 0, up.stdout + up.stderr
        exported = dict(
            line.removeprefix("export ").split("=", 1)
            for line in (root / "team" / "env").read_text().splitlines()
            if line.startswith("export ")
        )
        assert exported["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{mlflow_port}"
        assert exported["TEAM_TUNE_STORAGE"] == f"postgresql://pipeline@127.0.0.1:{pg_port}/optuna"
        pgpass = Path(exported["PGPASSFILE"])
        assert pgpass.stat().st_mode & 0o077 == 0
        password = team_stack.read_pgpass_password(pgpass)
        assert password not in (root / "team" / "env").read_text() + up.stdout

        client_env = {**env, **exported}
        check = (
            "import optuna, mlflow, os;"
            "s = optuna.create_study(storage=os.environ['TEAM_TUNE_STORAGE'], study_name='smoke');"
            "s.optimize(lambda t: t.suggest_float('x', 0, 1), n_trials=2);"
            "mlflow.set_experiment('smoke');"
            "r = mlflow.start_run(); mlflow.log_metric('m', 1.0); mlflow.log_text('hello', 'a.txt'); mlflow.end_run();"
            "print(len(s.trials), mlflow.get_run(r.info.run_id).data.metrics['m'])"
        )
        smoke = subprocess.run(
            [sys.executable, "-c", check], env=client_env, capture_output=True, text=True, timeout=300
        )
        assert smoke.returncode == 0, smoke.stderr[-3000:]
        assert smoke.stdout.splitlines()[-1].split() == ["2", "1.0"]  # (MLflow prints a run link first)
        assert list((root / "team" / "mlartifacts").rglob("a.txt"))
    finally:
        down = subprocess.run(
            [*command[:3], "down", *command[3:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        shutil.rmtree(root, ignore_errors=True)
    assert down.returncode == 0, down.stdout + down.stderr
    for port in (pg_port, mlflow_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
