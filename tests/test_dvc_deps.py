"""dvc.yaml declares the code each stage runs (by folder, checked against its imports), and the
tune study identity hashes that code."""

from __future__ import annotations

import hashlib

import pytest
import yaml

from pipeline.runtime import code_deps
from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _definition(name: str) -> dict:
    return STAGES[name].get("do", STAGES[name])  # foreach stages keep their definition under `do`


def _code(name: str) -> list[str]:
    return [dep for dep in _definition(name)["deps"] if dep.startswith("pipeline/")]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_stage_declares_the_pipeline_code_its_command_imports_and_nothing_else(name):
    entry = code_deps.entry_of(STAGES[name])
    assert code_deps.coverage_problems(_code(name), entry) == [], f"dvc.yaml stage {name!r}"


def test_the_coverage_check_names_a_missing_module_and_an_unused_folder():
    files = code_deps.stage_files("stages.tune")
    assert "pipeline/stack/optuna_study.py" in files
    declared = ["pipeline/core", "pipeline/analysis", "pipeline/stack/optuna_outputs.py", "pipeline/stages/tune.py"]
    assert code_deps.coverage_problems(declared, "stages.tune") == [
        "not declared: pipeline/stack/optuna_study.py",
        "declared but not its code: pipeline/analysis",
    ]


def test_imports_are_followed_through_functions_and_packages_but_not_into_observers():
    train = code_deps.stage_modules("stages.train")
    assert "core.splits" in train  # imported by the stage for --train-per-class
    assert "core.frozen_features" in train and "core.fit" in train
    assert not any(module.startswith("runtime.") for module in train)  # command line, errors, atomic writes
    assert "stack.tracking" not in train  # an observer: mirrors, never decides
    assert "stack.tracking" in code_deps.stage_modules("stages.register")  # the registry entry is register's output
    assert "stack.serving" in code_deps.stage_modules("stages.register") and "stack.serving" not in train
    assert "pipeline/core/__init__.py" not in code_deps.stage_files("stages.train")  # a docstring only


def test_no_stage_imports_another_stage():
    stages = {code_deps.entry_of(stage) for stage in STAGES.values()}
    for entry in stages:
        others = {module for module in code_deps.stage_modules(entry) if module.startswith("stages.")}
        others -= {entry, "stages"} | {m for m in others if m.startswith(entry + ".")}
        assert others == set(), f"{entry} imports {sorted(others)}"


# what each folder of pipeline/ may import (README "Development"): dependencies point one way
ALLOWED = {
    "runtime": set(),
    "core": {"runtime"},
    "analysis": {"core", "runtime"},
    "stack": {"core", "runtime"},
    "stages": {"analysis", "core", "runtime", "stack"},
    "tools": {"analysis", "core", "runtime", "stack", "stages"},
}


def test_every_folder_imports_only_the_folders_below_it_and_no_private_name():
    wrong = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        parts = path.relative_to(REPO / "pipeline").with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not module:
            continue
        folder = module.split(".")[0]
        for imported in code_deps.imports_of(module):
            if imported.split(".")[0] not in ALLOWED[folder] | {folder}:
                wrong.append(f"{module} imports {imported}")
        wrong += [f"{module} imports {name}" for name in _private_names_imported(path)]
    assert wrong == []


def _private_names_imported(path) -> list[str]:
    """`from pipeline.x import _name`: another module's private helper, used from outside it."""
    import ast

    return [
        f"{node.module}.{alias.name}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline")
        for alias in node.names
        if alias.name.startswith("_")
    ]


def test_the_tune_study_identity_hashes_the_code_of_the_tune_stage():
    from pipeline.stages.tune import _code_sha256

    digest = hashlib.sha256()
    for path in code_deps.stage_files("stages.tune"):
        digest.update(path.encode() + b"\0" + (REPO / path).read_bytes())
    assert _code_sha256() == digest.hexdigest()


def _params_keys(name: str) -> list[str]:
    """A stage's `params:` as keys: bare keys and `params.yaml: [...]` entries (the shared anchors)."""
    keys = []
    for entry in _definition(name).get("params", []):
        keys += [entry] if isinstance(entry, str) else [key for listed in entry.values() for key in listed]
    return keys


def test_tracking_settings_do_not_invalidate_results():
    """Only register, whose output is the MLflow registry entry, depends on the `mlflow` section."""
    readers = sorted(name for name in STAGES if any(key.split(".")[0] == "mlflow" for key in _params_keys(name)))
    assert readers == ["register"]


def test_no_params_list_is_repeated_across_stages():
    """A list several stages read is written once (an anchor under `vars:`), not copied per stage."""
    text = (REPO / "dvc.yaml").read_text()
    for key in ("train.mixed_precision", "train.jit_compile", "data.fashion_mnist_dir", "data.skip_unreadable"):
        assert text.count(f"- {key}") == 1, key
