"""Safety rules that hold for the whole code base: safe loaders only, local-only UIs, no secrets logged."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.stack import tracking
from tests.conftest import REPO

SOURCES = sorted((REPO / "pipeline").rglob("*.py"))


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"\byaml\.(load|full_load|unsafe_load|load_all)\(", "YAML must be read with yaml.safe_load"),
        (r"\bimport pickle\b|\bpickle\.|\bdill\b|\bcloudpickle\b", "no pickle: data files must not run code"),
        (r"allow_pickle\s*=\s*True", "np.load must not unpickle object arrays"),
        (r"safe_mode\s*=\s*False", "Keras models are loaded in safe mode only"),
        (r"\beval\(|\bexec\(", "no eval/exec of inputs"),
        (r"shell\s*=\s*True", "subprocesses get argument lists, not shell strings"),
    ],
)
def test_no_unsafe_loader_in_the_pipeline(pattern, why):
    hits = [
        f"{path.name}:{number}: {line.strip()}"
        for path in SOURCES
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(pattern, line)
    ]
    assert not hits, f"{why}: {hits}"


def test_params_loader_is_a_safe_loader():
    """params.yaml is read by a SafeLoader subclass (it adds the duplicate-key check): a Python
    object tag is refused like yaml.safe_load refuses it."""
    import yaml

    from pipeline.core.params import _safe_load_unique, _StrictLoader

    assert issubclass(_StrictLoader, yaml.SafeLoader)
    with pytest.raises(yaml.constructor.ConstructorError):
        _safe_load_unique("seed: !!python/object/apply:os.system ['true']")


def test_every_keras_model_load_names_safe_mode():
    calls = [
        (path.name, line.strip())
        for path in SOURCES
        for line in path.read_text().splitlines()
        if "keras.models.load_model(" in line and not line.strip().startswith("#")
    ]
    assert calls, "the register stage loads a model; the scan found none"
    assert all("safe_mode=True" in line for _, line in calls), calls


def test_readme_web_uis_bind_to_localhost_only():
    readme = (REPO / "README.md").read_text()
    code = "\n".join(re.findall(r"(?ms)^```[a-z]*\n(.*?)^```", readme))  # the fenced blocks users copy
    commands = [line for line in code.splitlines() if re.search(r"\bmlflow (ui|server)\b", line)]
    assert commands, "the README shows how to start the MLflow UI"
    for line in commands:
        assert "--host 127.0.0.1" in line, line
    assert "0.0.0.0" not in readme


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://optuna:s3cret@db.example/studies", "postgresql://optuna:***@db.example/studies"),
        ("http://user:pa55@mlflow.example:5000", "http://user:***@mlflow.example:5000"),
        ("postgresql://optuna@db.example/studies", "postgresql://optuna@db.example/studies"),
        ("sqlite:///{home}/proj/mlflow.db", "sqlite:///~/proj/mlflow.db"),
        ("{home}", "~"),
        ("{home}-backup/data", "{home}-backup/data"),  # another folder that merely starts alike
        ("/srv/data", "/srv/data"),
    ],
)
def test_redact_masks_passwords_and_the_home_folder(text, expected):
    home = str(Path.home())
    assert tracking.redact(text.format(home=home)) == expected.format(home=home)


def test_logged_params_are_redacted_in_the_store(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.connect(uri, "safety")
    with tracking.run(
        "t", tags={"storage": "postgresql://u:hunter2@h/db"}, params={"tune": {"storage": "mysql://u:hunter2@h/db"}}
    ) as run_id:
        pass
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.data.params["tune.storage"] == "mysql://u:***@h/db"
    assert run.data.tags["storage"] == "postgresql://u:***@h/db"
