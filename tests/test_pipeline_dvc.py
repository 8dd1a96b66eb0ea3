"""The whole DAG through `dvc repro` in a temporary copy of the repository, on tiny data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_OVERRIDE, merge

pytestmark = pytest.mark.slow


def _copy_repository(target: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if name.startswith(("results/", "reports/", "docs/")) or name == "dvc.lock":
            continue  # outputs of an earlier run: this copy must produce its own
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target / name)


def _git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


def test_dvc_repro_runs_every_stage_then_nothing(tmp_path):
    from tests.conftest import make_tiny_project

    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_repository(repo)
    fixture_params, _ = make_tiny_project(tmp_path / "fixture", {"frozen": {"trainable": "none"}})
    data_dir = yaml.safe_load(fixture_params.read_text())["data"]["fashion_mnist_dir"]
    raw = merge(yaml.safe_load((repo / "params.yaml").read_text()), TINY_OVERRIDE)
    raw = merge(
        raw, {"data": {"fashion_mnist_dir": data_dir}, "train": {"epochs": 1}, "tune": {"n_trials": 2, "epochs": 1}}
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "copy")

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    first = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]

    variants = list(raw["variants"])
    for variant in variants:
        assert (repo / "results" / "tune" / variant / "best_params.json").is_file()
        assert (repo / "results" / "tune" / variant / "study.journal").is_file()
        summary = json.loads((repo / "results" / "train" / variant / "metrics.json").read_text())
        assert set(summary["seeds"]) == {"1", "2"}
        assert (repo / "results" / "train" / variant / "model.keras").is_file()
    for name in ("report.md", "report.html", "summary.json"):
        assert (repo / "reports" / name).is_file()
    assert (repo / "docs" / "convergence.png").is_file()
    assert json.loads((repo / "results" / "registered.json").read_text())["variant"] in variants

    # the default tracking URI resolved to the copy's root (DVC_ROOT), not a stage's working dir
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    experiment = client.get_experiment_by_name("vgg16-freezing")
    names = {r.info.run_name for r in client.search_runs([experiment.experiment_id], max_results=1000)}
    expected = {f"train/{v}/seed-{s}" for v in variants for s in (1, 2)} | {f"tune/{v}" for v in variants}
    assert (
        expected | {"report", f"register/{json.loads((repo / 'results' / 'registered.json').read_text())['variant']}"}
        <= names
    )
    statuses = {r.info.status for r in client.search_runs([experiment.experiment_id], max_results=1000)}
    assert statuses == {"FINISHED"}

    metrics = subprocess.run(["dvc", "metrics", "show"], cwd=repo, env=env, capture_output=True, text=True)
    assert "results/train/partial/metrics.json" in metrics.stdout and "test_accuracy_mean" in metrics.stdout

    second = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date." in second.stdout
