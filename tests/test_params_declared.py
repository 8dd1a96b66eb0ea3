"""The params each stage process of this test session read (tests/param_reads.py) are declared in
its dvc.yaml stage's `params:`: a value read but not declared would let `dvc repro` keep a stale
result after it changes. Runs last (tests/conftest.py orders it), over every stage process the
session's tests started with `stage_env`; the slow tests/test_pipeline_dvc.py also checks the
other direction (declared but never read) on the whole DAG."""

from __future__ import annotations

import json

import pytest

from tests import param_reads
from tests.conftest import PARAMS_READS, REPO


def test_every_stage_process_of_this_session_read_only_params_its_dvc_stage_declares():
    if not any(PARAMS_READS.glob("*.json")):
        pytest.skip("no stage process ran in this session; `make test` runs them before this check")
    assert param_reads.undeclared_reads(PARAMS_READS, REPO / "dvc.yaml") == {}


def test_a_read_that_the_stage_does_not_declare_is_named(tmp_path):
    def record(name, stage, argv, reads, status=0):
        text = json.dumps({"stage": stage, "argv": argv, "status": status, "reads": reads})
        (tmp_path / f"{name}.json").write_text(text)

    record(
        "a", "stages.train", ["train.py", "--variant", "frozen", "--best-params", "b"], ["variants.frozen.trainable"]
    )
    record("b", "stages.train", ["train.py", "--train-per-class", "3", "--best-params", "b"], ["train.seeds"])
    record("c", "stages.tune", ["tune.py", "--variant", "full"], ["tune.n_trials", "mlflow.experiment"])
    record("d", "stages.train", ["train.py", "--variant", "frozen"], ["model.head_units"])  # untuned: the default
    record("f", "stages.train", ["train.py", "--depth", "2", "--best-params", "b"], ["model.head_units", "seed"])
    record("e", "tools.bench", ["bench"], ["anything"])
    record("g", "stages.train", ["train.py", "--variant", "half", "--best-params", "b"], ["variants"], status=2)
    assert param_reads.undeclared_reads(tmp_path, REPO / "dvc.yaml") == {
        "depth_train": ["model.head_units", "seed"],
        "sample_efficiency": ["train.seeds"],
        "tune": ["mlflow.experiment"],
    }
