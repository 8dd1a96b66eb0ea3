"""dvc.yaml declares exactly the code each stage runs, and the tune study identity hashes it."""

from __future__ import annotations

import hashlib
import re

import pytest
import yaml

from pipeline import code_deps
from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _definition(name: str) -> dict:
    return STAGES[name].get("do", STAGES[name])  # foreach stages keep their definition under `do`


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_stage_declares_exactly_the_pipeline_modules_its_command_imports(name):
    stage = _definition(name)
    entry = re.search(r"python -m pipeline\.(\w+)", stage["cmd"]).group(1)
    declared = sorted(dep for dep in stage["deps"] if dep.startswith("pipeline/"))
    assert declared == code_deps.stage_files(entry), (
        f"dvc.yaml stage {name!r}: set its pipeline/ deps to {code_deps.stage_files(entry)}"
    )


def test_imports_are_followed_through_functions_and_packages_but_not_into_observers():
    train = code_deps.stage_modules("train")
    assert "prepare" in train  # imported inside a function (--train-per-class)
    assert "tracking" not in train and "cli" not in train  # observers: mirror and report, never decide
    assert "tracking" in code_deps.stage_modules("register")  # the registry entry is register's output
    assert "serving" in code_deps.stage_modules("register") and "serving" not in train


def test_the_tune_study_identity_hashes_the_files_dvc_yaml_declares_for_tune():
    from pipeline.tune import _code_sha256

    declared = sorted(dep for dep in _definition("tune")["deps"] if dep.startswith("pipeline/"))
    digest = hashlib.sha256()
    for path in declared:
        digest.update(path.encode() + b"\0" + (REPO / path).read_bytes())
    assert _code_sha256() == digest.hexdigest()


def test_tracking_settings_do_not_invalidate_results():
    """Only register, whose output is the MLflow registry entry, depends on the `mlflow` section."""
    readers = sorted(
        name for name in STAGES if any(key.split(".")[0] == "mlflow" for key in _definition(name).get("params", []))
    )
    assert readers == ["register"]
