"""The whole DAG through `dvc repro` in a temporary copy of the repository, on tiny data."""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.params import load_params
from pipeline.core.results import TIMING_COLUMNS
from pipeline.tools.bench.scale import copy_repository
from tests import param_reads
from tests.conftest import TINY_OVERRIDE, as_from_a_terminal, merge

pytestmark = pytest.mark.slow


def _git(repo: Path, *args: str) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git copy of the repository on tiny data after one complete `dvc repro`."""
    from tests.conftest import make_tiny_project

    tmp_path = tmp_path_factory.mktemp("dvc")
    repo = copy_repository(tmp_path / "repo")  # tracked files, no outputs, committed
    fixture_params, _ = make_tiny_project(tmp_path / "fixture", {"frozen": {"trainable": "none"}})
    data_dir = yaml.safe_load(fixture_params.read_text())["data"]["fashion_mnist_dir"]
    raw = merge(yaml.safe_load((repo / "params.yaml").read_text()), TINY_OVERRIDE)
    raw = merge(
        raw,
        {
            "data": {"fashion_mnist_dir": data_dir},
            "train": {"max_epochs": 2},
            "tune": {"n_trials": 3, "halving_epoch": 1, "halving_factor": 2},  # the halving path, rerun bit for bit
            "studies": {"robustness": {"enabled": True}},  # every setting of every stage is read
        },
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _git(repo, "commit", "-qam", "tiny params")

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    env = param_reads.environment(tmp_path / "params-reads", env)  # every stage records the params it reads
    first = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    return repo, env, raw, first


def test_dvc_repro_runs_every_stage_then_nothing(project):
    repo, env, raw, first = project
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
    registered = json.loads((repo / "results" / "registered.json").read_text())
    summary = json.loads((repo / "reports" / "summary.json").read_text())
    assert registered["variant"] == summary["answer"]["recommended"]  # register and report: one rule
    assert set(summary["baselines"]) == {"pixels_logistic_regression", "frozen_linear_probe"}
    baselines = json.loads((repo / "results" / "baselines" / "metrics.json").read_text())
    assert baselines["frozen_linear_probe"]["test_images"] == 20
    assert all(summary[v]["test_images"] == 20 and summary[v]["seeds"] == 2 for v in variants)

    # the default tracking URI resolved to the copy's root (DVC_ROOT), not a stage's working dir
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    experiment = client.get_experiment_by_name("vgg16-freezing")
    names = {r.info.run_name for r in client.search_runs([experiment.experiment_id], max_results=1000)}
    expected = {f"train/{v}/seed-{s}" for v in variants for s in (1, 2)} | {f"tune/{v}" for v in variants}
    expected |= {"baseline/pixels_logistic_regression", "baseline/frozen_linear_probe", "predict"}
    assert "## What the cheap predictors said" in (repo / "reports" / "report.md").read_text()
    predicted = json.loads((repo / "results" / "predict" / "scores.json").read_text())
    assert set(predicted["predictions"]["logme"]["ranking"]) == set(variants)
    assert (
        expected | {"report", f"register/{json.loads((repo / 'results' / 'registered.json').read_text())['variant']}"}
        <= names
    )
    statuses = {r.info.status for r in client.search_runs([experiment.experiment_id], max_results=1000)}
    assert statuses == {"FINISHED"}

    metrics = subprocess.run(["dvc", "metrics", "show"], cwd=repo, env=env, capture_output=True, text=True)
    # one metrics file, numbers only: the strategies' test accuracy and interval, the baselines
    assert "reports/metrics.json" in metrics.stdout and "partial.test_acc" in metrics.stdout
    assert "pixels_lr" in metrics.stdout and "results/" not in metrics.stdout and "figures" not in metrics.stdout

    second = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date." in second.stdout


def _dvc(repo: Path, env: dict, *args: str, timeout: int = 900) -> str:
    run = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"dvc {' '.join(args)}: {(run.stdout + run.stderr)[-4000:]}"
    return run.stdout


def _file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under results/ (models, journals, per-seed files), by relative path."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((root / "results").rglob("*"))
        if path.is_file() and not path.name.endswith(".lock")
    }


@pytest.fixture(scope="module")
def pushed(project, tmp_path_factory):
    """The project committed to git and pushed, with the run cache, to a shared-folder DVC remote
    (README "Running on several machines"; S3 or SSH remotes differ only in the URL)."""
    repo, env, _, first = project
    assert first.returncode == 0
    remote = tmp_path_factory.mktemp("dvc-remote")
    _dvc(repo, env, "remote", "add", "--default", "shared", str(remote))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "results")
    _dvc(repo, env, "push", "--run-cache")
    return repo, env


def _clone(repo: Path, target: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(repo), str(target)], check=True, capture_output=True)
    return target


def test_a_fresh_clone_pulls_every_output_and_repro_runs_nothing(pushed, tmp_path):
    repo, env = pushed
    clone = _clone(repo, tmp_path / "colleague")
    _dvc(clone, env, "pull")
    assert "Data and pipelines are up to date." in _dvc(clone, env, "status")
    repro = _dvc(clone, env, "repro")
    assert "Running stage" not in repro and "Data and pipelines are up to date." in repro
    assert _file_digests(clone) == _file_digests(repo)  # models, per-seed files and the Optuna journals
    variants = {path.parent.name for path in (clone / "results" / "tune").glob("*/study.journal")}
    assert variants == {path.name for path in (repo / "results" / "train").iterdir()}  # tuning travels too


def test_a_training_run_on_one_machine_is_restored_on_another_from_the_run_cache(pushed, tmp_path):
    """A GPU box trains one strategy under a changed setting and pushes with the run cache; a
    colleague who makes the same change gets that training restored, not rerun."""
    repo, env = pushed

    def change_setting(clone: Path) -> None:
        raw = yaml.safe_load((clone / "params.yaml").read_text())
        raw["report"]["target_accuracy"] = 0.05  # read by every train@ stage
        (clone / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    gpu_box = _clone(repo, tmp_path / "gpu-box")
    _dvc(gpu_box, env, "pull")
    change_setting(gpu_box)
    trained = _dvc(gpu_box, env, "repro", "train@frozen")
    assert "Running stage 'train@frozen'" in trained
    _dvc(gpu_box, env, "push", "--run-cache")

    laptop = _clone(repo, tmp_path / "laptop")
    change_setting(laptop)
    restored = _dvc(laptop, env, "repro", "--pull", "train@frozen")
    assert "Stage 'train@frozen' is cached - skipping run, checking out outputs" in restored
    assert "Running stage" not in restored
    frozen = {k: v for k, v in _file_digests(laptop).items() if k.startswith("results/train/frozen/")}
    assert frozen and frozen == {k: v for k, v in _file_digests(gpu_box).items() if k in frozen}
    seed = json.loads((laptop / "results" / "train" / "frozen" / "seeds" / "1" / "metrics.json").read_text())
    assert seed["target_accuracy"] == 0.05  # the results of the new setting, not the committed ones


def _results(repo: Path) -> dict[str, object]:
    """Every result file that must reproduce, with the wall-clock fields removed."""
    out: dict[str, object] = {}
    for path in sorted((repo / "results" / "train").rglob("metrics.json")):
        data = json.loads(path.read_text())
        data.pop("timing", None)
        out[str(path.relative_to(repo))] = data
    for path in sorted((repo / "results" / "train").rglob("history.csv")):
        rows = list(csv.DictReader(path.open()))
        out[str(path.relative_to(repo))] = [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]
    for path in sorted((repo / "results" / "tune").rglob("trials.csv")):
        rows = list(csv.DictReader(path.open()))
        out[str(path.relative_to(repo))] = [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    for path in sorted((repo / "results").rglob("test_predictions.csv")):
        out[str(path.relative_to(repo))] = path.read_text()
    out["results/baselines/metrics.json"] = json.loads((repo / "results" / "baselines" / "metrics.json").read_text())
    for path in sorted((repo / "results" / "tune").rglob("best_params.json")):
        out[str(path.relative_to(repo))] = json.loads(path.read_text())
    return out


def test_dvc_repro_force_reproduces_every_result_bit_for_bit(project):
    """Tuning from empty journals and training again give the same bytes (timing fields aside)."""
    repo, env, _, first = project
    assert first.returncode == 0
    before = _results(repo)
    assert len(before) > 20
    for journal in (repo / "results" / "tune").glob("*/study.journal"):
        journal.unlink()  # persistent (DVC keeps it under --force): otherwise --force would reuse the trials
    forced = subprocess.run(
        ["dvc", "repro", "--force"], cwd=repo, env=env, capture_output=True, text=True, timeout=1800
    )
    assert forced.returncode == 0, (forced.stdout + forced.stderr)[-4000:]
    assert forced.stdout.count("Running stage 'train@") == len(project[2]["variants"])
    after = _results(repo)
    assert after.keys() == before.keys()
    assert [name for name in before if after[name] != before[name]] == []


def test_ctrl_c_during_dvc_repro_then_repro_resumes_where_it_stopped(project):
    repo, env, raw, first = project
    assert first.returncode == 0
    before = _results(repo)
    process = subprocess.Popen(
        ["dvc", "repro", "--force"],
        cwd=repo,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=as_from_a_terminal,
    )
    started, seen = [], []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("Running stage 'train@"):
            started.append(line.split("'")[1])
        elif len(started) == 2 and line.startswith("[train/"):  # the second train stage is training
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
            break
    process.communicate(timeout=300)
    assert process.returncode != 0, "".join(seen)[-3000:]
    done, interrupted = started

    resumed = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    ran = [line.split("'")[1] for line in resumed.stdout.splitlines() if line.startswith("Running stage '")]
    assert done not in ran and "prepare" not in ran
    assert not [stage for stage in ran if stage.startswith("tune@")]
    # the interrupted stage comes back, trained again or restored from DVC's run cache (its inputs
    # and settings are those of an earlier complete run), with the same results either way
    restored = f"Stage '{interrupted}' is cached - skipping run, checking out outputs" in resumed.stdout
    assert (interrupted in ran) != restored, resumed.stdout[-3000:]
    assert _results(repo) == before

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    experiment = client.get_experiment_by_name("vgg16-freezing")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert "RUNNING" not in {r.info.status for r in runs}
    assert {r.info.run_name for r in runs if r.info.status == "KILLED"} <= {
        f"train/{interrupted.split('@')[1]}/seed-{seed}" for seed in raw["train"]["seeds"]
    }


def test_each_study_runs_with_its_one_documented_command(project):
    """README "Studies": `dvc exp run -S <the study's list>`; the report then shows its section.
    (Last in this module: it changes the workspace's params.yaml, as `dvc exp run` does.)"""
    repo, env, _, _ = project
    commands = {
        "sample_efficiency": [
            "-S",
            "studies.sample_efficiency.train_per_class=[1,3]",
            "-S",
            "studies.sample_efficiency.seeds=[1,2]",
        ],
        "depth": ["-S", "studies.depth.k=[0,13]", "-S", "studies.depth.seeds=[1]"],
        "parameter_efficient": ["-S", "studies.parameter_efficient.run=[bias_only,surgical_block5]"],
    }
    for settings in commands.values():
        run = subprocess.run(
            ["dvc", "exp", "run", *settings], cwd=repo, env=env, capture_output=True, text=True, timeout=1800
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Running stage 'prepare'" not in run.stdout  # the main pipeline was up to date
    studies = repo / "results" / "studies"
    for variant in ("scratch", "frozen", "last_layers", "partial", "full"):
        for n in (1, 3):
            metrics = json.loads((studies / "sample_efficiency" / variant / f"n{n}" / "metrics.json").read_text())
            assert sorted(metrics["seeds"]) == ["1", "2"]
    top0 = json.loads((studies / "depth/train/block5/top0/seeds/1/metrics.json").read_text())
    top13 = json.loads((studies / "depth/train/block5/top13/seeds/1/metrics.json").read_text())
    assert top0["parameters"]["per_block"]["block5"]["trainable"] == 0
    conv = [b for b in top13["parameters"]["per_block"] if b != "head"]
    assert sum(top13["parameters"]["per_block"][b]["non_trainable"] for b in conv) == 0
    assert top13["training_path"] == "end-to-end"
    assert set(top13["weight_drift"].values()) != {0.0} and set(top0["weight_drift"].values()) == {0.0}
    for n in (1, 3):
        references = json.loads((studies / "sample_efficiency" / "baselines" / f"n{n}" / "metrics.json").read_text())
        assert sorted(references["pixels_logistic_regression"]["seeds"]) == ["1", "2"]
    beyond = studies / "parameter_efficient" / "train"
    bias = json.loads((beyond / "bias_only/seeds/1/metrics.json").read_text())
    per_block = bias["parameters"]["per_block"]
    assert [per_block[b]["trainable"] for b in conv] == [128, 256, 768, 1536, 1536]  # the conv biases, 4,224
    assert bias["training_path"] == "end-to-end" and bias["frozen_weights_unchanged"] is True
    assert "robustness" in bias  # the study's own switch
    surgical = json.loads((beyond / "surgical_block5/seeds/1/metrics.json").read_text())
    assert surgical["training_path"] == "cached-features (cut after block4_pool)"
    text = (repo / "reports" / "report.md").read_text()
    assert "## Study: beyond layer freezing" in text
    assert "## Study: sample efficiency" in text and "## Study: freezing depth" in text
    assert "### Against the pixel baseline" in text
    status = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True)
    assert "changed" not in status.stdout, status.stdout


# Values a stage reads only in a configuration this module's DAG does not run; they stay declared,
# as a run in that configuration reads them (data.source: directory reads a folder of images; a
# head-only strategy in the parameter-efficient study would read the head-only learning-rate range,
# and the study's strategies this DAG runs all train conv layers)
CONDITIONAL = ("data.directory", "data.skip_unreadable")
CONDITIONAL_IN = {"parameter_efficient_tune": ("tune.learning_rate_head_only", "tune.head_only_reference_features")}


def _covered(key: str, declared: set[str]) -> bool:
    return any(key == d or key.startswith(f"{d}.") for d in declared)


def _generic(keys, stage_params: dict) -> set[str]:
    """`keys` with the stage's own strategy written `variants.*` (`variants.${key}` in dvc.yaml),
    so that the instances of one foreach/matrix stage compare as one definition."""
    own = [key for key in stage_params if key.count(".") == 1 and key.startswith("variants.")]
    if not own:
        return set(keys)
    return {"variants.*" + key[len(own[0]) :] if _covered(key, {own[0]}) else key for key in keys}


def test_every_stage_declares_exactly_the_params_it_reads(project):
    """dvc.yaml's `params:` against what each stage's code read (tests/param_reads.py) in every
    run of this module, the studies included (so last). Per stage instance: no value read that is
    not declared. Per stage definition (the instances of a foreach/matrix stage together, as they
    share one `params:` list): no declared value that none of them read."""
    repo, env, _, _ = project
    reads = collections.defaultdict(set)
    for path in Path(env[param_reads.ENV]).glob("*.json"):
        record = json.loads(path.read_text())
        reads[record["stage"]] |= set(record["reads"])
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert sorted(reads) == sorted(stages)  # every stage ran and recorded, the studies' too
    leaves = param_reads.leaf_keys(load_params(repo / "params.yaml"))
    wrong: dict[str, dict] = {}
    declared_by, read_by, leaves_by = collections.defaultdict(set), collections.defaultdict(set), {}
    for name, stage in stages.items():
        declared = set(stage.get("params", {}).get("params.yaml", {}))
        undeclared = sorted(key for key in reads[name] if not _covered(key, declared))
        if undeclared:
            wrong[name] = {"read but not declared": undeclared}
        definition = name.split("@")[0]
        declared_by[definition] |= _generic(declared, declared)
        read_by[definition] |= _generic(reads[name], declared)
        leaves_by[definition] = _generic(leaves, declared)
    for definition, declared in declared_by.items():
        unread = sorted(
            key
            for key in declared
            if not _covered(key, read_by[definition])  # a mapping iterated whole covers its entries
            and not {leaf for leaf in leaves_by[definition] if _covered(leaf, {key})}
            <= read_by[definition] | set(CONDITIONAL) | set(CONDITIONAL_IN.get(definition, ()))
        )
        if unread:
            wrong.setdefault(definition, {})["declared but not read"] = unread
    assert not wrong, json.dumps(wrong, indent=1)
