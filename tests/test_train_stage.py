"""The train stage end to end: `python -m pipeline.stages.train` on tiny prepared data, real MLflow."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cli, make_tiny_project, run_stage, stage_env


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    """Tiny prepared data, then train@last_layers once for the whole module: the last conv layer of a
    base cut after block4 (train, register and serve a truncated network)."""
    root = tmp_path_factory.mktemp("stage")
    robustness = {"studies": {"robustness": {"enabled": True}}}  # off by default (cost), on here
    strategy = {"trainable": ["block4_conv3"], "cut_after": "block4"}
    params_path, _ = make_tiny_project(root, {"last_layers": strategy}, robustness)
    return root, params_path, _train(root, params_path, "last_layers")


def _train(root, params_path, variant):
    return run_stage(
        "train",
        *cli(
            variant=variant,
            params=params_path,
            prepared=root / "prepared",
            out=root / "results" / variant,
            feature_cache=root / "cache",
        ),
        env={**stage_env(root), "HOME": str(root)},
    )


def test_stage_writes_per_seed_outputs(stage_run):
    root, _, result = stage_run
    assert result.returncode == 0, result.stderr[-3000:]
    out = root / "results" / "last_layers"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.keras", "seeds"]
    assert sorted(p.name for p in (out / "seeds").iterdir()) == ["1", "2"]
    for seed in ("1", "2"):
        files = out / "seeds" / seed
        assert sorted(p.name for p in files.iterdir()) == [
            "confusion_matrix.csv",
            "history.csv",
            "metrics.json",
            "test_predictions.csv",
        ]
        rows = list(csv.DictReader((files / "history.csv").open()))
        assert [r["epoch"] for r in rows] == ["1", "2"]
        assert list(rows[0]) == [
            "epoch",
            "phase",
            "loss",
            "accuracy",
            "val_loss",
            "val_accuracy",
            "epoch_seconds",
            "cumulative_seconds",
            "images_seen",
            "drift_block1",
            "drift_block2",
            "drift_block3",
            "drift_block4",
            "drift_block5",
        ]
        assert [r["phase"] for r in rows] == ["main", "main"]
        assert {r[f"drift_block{b}"] for r in rows for b in (1, 2, 3, 5)} == {"0.0"}  # block5: removed
        assert all(float(r["drift_block4"]) > 0 for r in rows)
        matrix = list(csv.reader((files / "confusion_matrix.csv").open()))
        assert len(matrix) == 11 and len(matrix[0]) == 11
        assert sum(int(v) for row in matrix[1:] for v in row[1:]) == 20  # 2 test images x 10 classes
        metrics = json.loads((files / "metrics.json").read_text())
        assert metrics["epochs_run"] == len(rows) and metrics["max_epochs"] == 2 and metrics["patience"] == 1
        assert 1 <= metrics["best_epoch"] <= metrics["epochs_run"] and isinstance(metrics["stopped_early"], bool)
        predictions = list(csv.DictReader((files / "test_predictions.csv").open()))
        assert [int(r["image"]) for r in predictions] == list(range(20))
        right = sum(r["label"] == r["predicted"] for r in predictions)
        assert right / 20 == pytest.approx(metrics["test_accuracy"])  # the rows the paired intervals use
        # head: block4_pool at 32x32 is 2x2x512, flattened (2,048 values) -> Dense(8) -> Dense(10)
        assert metrics["parameters"]["trainable"] == 2_359_808 + (2048 * 8 + 8) + (8 * 10 + 10)
        assert metrics["parameters"]["per_block"]["block4"] == {"trainable": 2_359_808, "non_trainable": 3_539_968}
        assert metrics["parameters"]["per_block"]["block5"] == {"trainable": 0, "non_trainable": 0}
        assert metrics["parameters"]["non_trainable"] == 7_635_264 - 2_359_808 + 2 * 2048 + 1  # + head_norm stats
        assert metrics["cut_after"] == "block4"
        assert metrics["frozen_weights_unchanged"] is True
        assert metrics["training_path"] == "cached-features (cut after block4_conv2)"
        assert set(metrics["test_recall_per_class"]) >= {"Trouser", "Ankle boot"}
        assert metrics["weight_drift"]["block1"] == 0.0 and metrics["weight_drift"]["block4"] > 0
        assert metrics["robustness"]["severity"] == 3 and set(metrics["robustness"]["drop"]) == {
            "gaussian_noise",
            "blur",
            "contrast",
        }
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["seeds"]) == {"1", "2"}
    mean = np.mean([summary["seeds"][s]["test_accuracy"] for s in ("1", "2")])
    assert summary["test_accuracy_mean"] == pytest.approx(mean)


def test_saved_model_loads_in_safe_mode_and_matches_best_seed(stage_run):
    import keras

    import pipeline.core.model  # noqa: F401  registers the VGG16Preprocess layer for loading
    from pipeline.core.data import load_split

    root, _, result = stage_run
    assert result.returncode == 0
    out = root / "results" / "last_layers"
    model = keras.models.load_model(out / "model.keras", safe_mode=True)
    images, labels = load_split(root / "prepared", "test")
    accuracy = float(np.mean(model.predict(images, verbose=0).argmax(axis=1) == labels))
    summary = json.loads((out / "metrics.json").read_text())
    assert accuracy == pytest.approx(summary["seeds"][str(summary["best_seed"])]["test_accuracy"])


def test_mlflow_has_one_finished_run_per_seed_with_curves_counts_and_artifacts(stage_run):
    from mlflow.tracking import MlflowClient

    root, _, result = stage_run
    assert result.returncode == 0
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("vgg16-freezing")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"train/last_layers/seed-1", "train/last_layers/seed-2"}
    run = runs["train/last_layers/seed-2"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["variant"] == "last_layers" and run.data.tags["seed"] == "2"
    assert run.data.tags["weights_sha256"].startswith("4502df9d")
    assert len(run.data.tags["data_sha256"]) == 64
    assert run.data.params["train.max_epochs"] == "2" and run.data.params["model.head_units"] == "8"
    assert run.data.params["cut_after"] == "block4"
    assert run.data.metrics["parameters/trainable_block4"] == 2_359_808
    assert (
        run.data.metrics["parameters/non_trainable"] == 7_635_264 - 2_359_808 + 2 * 2048 + 1
    )  # the base up to block4_pool but its last layer, + the head's mean, variance, count
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "curves/val_accuracy")]
    assert steps == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "history.csv",
        "metrics.json",
        "confusion_matrix.csv",
        "confusion_matrix.png",
        "model_summary.txt",
    } <= artifacts


def test_runs_read_well_in_mlflow_and_in_the_terminal(stage_run):
    """Metric sections in review order (MLflow sorts sections alphabetically: `curves` first), the
    prepared splits as dataset inputs, system metrics, and a terminal with one line per epoch and
    none of TensorFlow's start-up noise."""
    from mlflow.tracking import MlflowClient

    from pipeline.stack.tracking import split_digests

    root, _, result = stage_run
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("vgg16-freezing")
    [run] = client.search_runs([experiment.experiment_id], "attributes.run_name = 'train/last_layers/seed-1'")
    names = set(run.data.metrics)
    assert all("/" in name for name in names)  # nothing in MLflow's catch-all "Model metrics" section
    sections = sorted({name.rsplit("/", 1)[0] for name in names if not name.startswith("system/")})
    assert sections == [
        "curves",
        "evaluation",
        "evaluation/recall",
        "parameters",
        "robustness",
        "timing",
        "weight_drift",
    ]
    assert {n for n in names if n.startswith("curves/")} == {
        "curves/train_loss",
        "curves/train_accuracy",
        "curves/val_loss",
        "curves/val_accuracy",
    }
    assert "evaluation/recall/T-shirt_top" in names and sum(n.startswith("evaluation/recall/") for n in names) == 10
    # one clock: MLflow's per-epoch seconds are the ones history.csv holds, not a second timing
    with (root / "results" / "last_layers" / "seeds" / "1" / "history.csv").open() as f:
        written = [float(row["epoch_seconds"]) for row in csv.DictReader(f)]
    logged = [
        m.value
        for m in sorted(client.get_metric_history(run.info.run_id, "timing/epoch_seconds"), key=lambda m: m.step)
    ]
    assert logged == pytest.approx(written, rel=1e-6) and len(written) == 2
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= names
    summary = json.loads((root / "prepared" / "summary.json").read_text())
    expected = split_digests(summary)
    found = {(d.dataset.name, d.dataset.digest, d.tags[0].value) for d in run.inputs.dataset_inputs}
    assert found == {("fashion_mnist-32px", expected[c][:16], c) for c in ("training", "validation", "test")}
    assert {json.loads(d.dataset.source)["uri"] for d in run.inputs.dataset_inputs} == {"~/prepared"}
    epochs = [line.split("] epoch ")[1].split(":")[0] for line in result.stdout.splitlines() if "] epoch " in line]
    assert epochs == ["1/2", "2/2", "1/2", "2/2"]  # two seeds, one line per epoch
    assert "[train/last_layers] 2 seeds: test accuracy mean" in result.stdout
    for noise in ("cuInit", "absl::InitializeLog", "cudart_stub", "oneDNN custom operations", "system_metrics_monitor"):
        assert noise not in result.stderr + result.stdout


def test_unknown_variant_exits_2_naming_the_defined_ones(stage_run):
    root, params_path, _ = stage_run
    result = _train(root, params_path, "half")
    assert result.returncode == 2
    assert "variants: has no strategy 'half'; defined: last_layers" in result.stderr
    assert not (root / "results" / "half").exists()


@pytest.fixture(scope="module")
def registered(stage_run):
    root, params_path, result = stage_run
    assert result.returncode == 0
    options = cli(
        params=params_path,
        train_dir=root / "results",
        tune_dir=root / "no-tune",  # not tuned here (the repository's results/tune must not leak in)
        baselines_dir=root / "no-baselines",  # not the repository's results/ of a user who ran `make repro`
        prepared=root / "prepared",
        out=root / "registered.json",
    )
    run = run_stage("register", *options, env=stage_env(root), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return root, run


def test_register_registers_the_recommended_model_with_a_card_and_the_champion_alias(registered):
    import mlflow

    root, run = registered
    record = json.loads((root / "registered.json").read_text())
    assert record["variant"] == "last_layers" and record["version"] == 1
    assert record["registered_model"] == "vgg16-freezing-best"
    assert "mlflow.pyfunc.load_model('models:/vgg16-freezing-best@champion')" in run.stdout
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    [logged] = client.search_runs(
        [client.get_experiment_by_name("vgg16-freezing").experiment_id], "attributes.run_name = 'register/last_layers'"
    )
    assert logged.data.metrics and all(name.startswith("registered/") for name in logged.data.metrics)  # no curves
    version = client.get_model_version_by_alias("vgg16-freezing-best", "champion")
    assert str(version.version) == "1"
    summary = json.loads((root / "results" / "last_layers" / "metrics.json").read_text())
    seed_metrics = json.loads(
        (root / "results/last_layers/seeds" / str(summary["best_seed"]) / "metrics.json").read_text()
    )
    assert version.tags["strategy"] == "last_layers" and version.tags["seed"] == str(summary["best_seed"])
    assert version.tags["seeds"] == "2" and version.tags["head_units"] == str(seed_metrics["head_units"])
    assert version.tags["data_sha256"] == json.loads((root / "prepared/summary.json").read_text())["data_sha256"]
    assert version.tags["weights"] == "hed" and version.tags["test_accuracy_ci95"].startswith("[")
    assert json.loads(version.tags["class_names"])[0] == "T-shirt/top"
    assert "Input: RGB images, uint8 0..255, shape (n, 32, 32, 3)" in version.description


LOAD_ANYWHERE = """
import json, sys
import numpy as np
import mlflow
model = mlflow.pyfunc.load_model("models:/vgg16-freezing-best@champion")
assert "pipeline" not in sys.modules or sys.modules["pipeline"].__file__.find("/code/") > 0, "imported the repo"
images = np.load(sys.argv[1])["images"][:5]
table = model.predict(images)
signature = model.metadata.signature
print(json.dumps({"columns": list(table.columns), "classes": table["predicted_class"].tolist(),
                  "probabilities": table.iloc[:, 1:].to_numpy().tolist(),
                  "input": str(signature.inputs), "example": model.metadata.saved_input_example_info is not None,
                  "pipeline_from": sys.modules["pipeline"].__file__}))
"""


def test_registered_model_loads_from_any_folder_and_predicts_like_the_trained_one(registered, tmp_path):
    """A fresh interpreter in a folder outside the repository (no `pipeline` on its path) loads
    the champion with MLflow's own client: the shipped code, the signature, the class names, and
    the probabilities of the trained Keras model."""
    import keras

    import pipeline.core.model  # noqa: F401  registers VGG16Preprocess (for the reference predictions only)
    from pipeline.core.data import load_split

    root, _ = registered
    env = {k: v for k, v in stage_env(root).items() if k != "PYTHONPATH"}
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_ANYWHERE, str(root / "prepared" / "test.npz")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    out = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert "/code/pipeline/" in out["pipeline_from"]  # the model's own copy of the code, not the repository's
    class_names = json.loads((root / "prepared" / "classes.json").read_text())
    assert out["columns"] == ["predicted_class", *class_names]
    assert "uint8" in out["input"] and "(-1, 32, 32, 3)" in out["input"] and out["example"]
    model = keras.models.load_model(root / "results" / "last_layers" / "model.keras", safe_mode=True)
    images = load_split(root / "prepared", "test")[0][:5]
    expected = model.predict(images.astype("float32"), verbose=0)
    np.testing.assert_allclose(np.array(out["probabilities"]), expected, atol=1e-6)
    assert out["classes"] == [class_names[i] for i in expected.argmax(axis=1)]
    assert "cuInit" not in loaded.stderr and "Downloading artifacts" not in loaded.stderr


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_class_names(registered):
    """`mlflow models serve` (the README's command) on 127.0.0.1: one image POSTed to
    /invocations comes back with its class name and the probabilities."""
    from pipeline.core.data import load_split

    root, _ = registered
    port = _free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/vgg16-freezing-best@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        # the server starts `uvicorn` by name: the virtualenv's bin folder must be on PATH (README: activate it)
        env={**stage_env(root), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/ping", seconds=180)
        image = load_split(root / "prepared", "test")[0][:1]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": image.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    [prediction] = answer["predictions"]
    class_names = json.loads((root / "prepared" / "classes.json").read_text())
    assert prediction["predicted_class"] in class_names
    assert sum(prediction[name] for name in class_names) == pytest.approx(1.0, abs=1e-5)


def test_same_seed_twice_gives_byte_identical_results_apart_from_timing(stage_run, tmp_path):
    from pipeline.core.results import TIMING_COLUMNS

    root, params_path, result = stage_run
    assert result.returncode == 0
    options = cli(
        variant="last_layers",
        params=params_path,
        prepared=root / "prepared",
        out=tmp_path / "again",
        feature_cache=tmp_path,
    )
    again = run_stage("train", *options, env=stage_env(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    for seed in ("1", "2"):
        first, second = root / "results" / "last_layers" / "seeds" / seed, tmp_path / "again" / "seeds" / seed
        assert (first / "confusion_matrix.csv").read_bytes() == (second / "confusion_matrix.csv").read_bytes()
        strip = lambda m: {k: v for k, v in json.loads(m.read_text()).items() if k != "timing"}  # noqa: E731
        assert strip(first / "metrics.json") == strip(second / "metrics.json")
        rows = [list(csv.DictReader((d / "history.csv").open())) for d in (first, second)]
        assert [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows[0]] == [
            {k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows[1]
        ]
    assert (root / "results" / "last_layers" / "metrics.json").read_bytes() == (
        tmp_path / "again" / "metrics.json"
    ).read_bytes()


def test_logged_params_tags_and_artifacts_hold_no_home_path(stage_run, tmp_path):
    """The stage ran with HOME = the project folder, which holds the data: MLflow must show `~`."""
    from mlflow.tracking import MlflowClient

    root, _, result = stage_run
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(stage_env(root)["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("vgg16-freezing")
    runs = client.search_runs([experiment.experiment_id])  # the train runs and the register test's run
    assert sorted(r.info.run_name for r in runs if r.info.run_name.startswith("train/")) == [
        "train/last_layers/seed-1",
        "train/last_layers/seed-2",
    ]
    for run in runs:
        if run.info.run_name.startswith("train/"):
            assert run.data.params["data.fashion_mnist_dir"] == "~/fmnist"
            assert run.data.tags["mlflow.source.name"] == "pipeline/stages/train.py"
        leaked = {k: v for k, v in {**run.data.params, **run.data.tags}.items() if str(root) in v}
        assert not leaked
        folder = tmp_path / run.info.run_id
        folder.mkdir()
        client.download_artifacts(run.info.run_id, "", str(folder))
        texts = [p for p in folder.rglob("*") if p.suffix in (".json", ".csv", ".txt", ".yaml", "") and p.is_file()]
        assert len(texts) >= (4 if run.info.run_name.startswith("train/") else 0)
        assert not [p.name for p in texts if str(root) in p.read_text()]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it where apt works)"
)
def test_mlflow_ui_opens_a_run_on_its_training_curves_and_lists_the_dataset(stage_run):
    """The real MLflow UI in headless Chromium: a train run's chart view lists the `curves`
    section before the others, and the runs table shows the dataset. With MLFLOW_UI_SCREENSHOT
    set, the run's charts are saved there (the README's picture)."""
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    root, _, result = stage_run
    assert result.returncode == 0
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vgg16-freezing")
    [run] = client.search_runs([experiment.experiment_id], "attributes.run_name = 'train/last_layers/seed-1'")
    port = _free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "ui",
            "--backend-store-uri",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/health")
        base = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/runs/{run.info.run_id}/model-metrics")
            page.get_by_text("curves", exact=True).first.wait_for(timeout=60_000)
            page.wait_for_timeout(2000)  # charts render after their section headers
            text = page.inner_text("body")
            if os.environ.get("MLFLOW_UI_SCREENSHOT"):
                page.screenshot(path=os.environ["MLFLOW_UI_SCREENSHOT"])
            page.goto(f"{base}/runs")
            page.get_by_text("train/last_layers/seed-1").first.wait_for(timeout=60_000)
            page.wait_for_timeout(2000)
            table = page.inner_text("body")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    sections = [name for name in ("curves", "evaluation", "parameters", "timing", "weight_drift") if name in text]
    assert sections[0] == "curves", sections
    positions = [text.index(name) for name in sections]
    assert positions == sorted(positions), dict(zip(sections, positions, strict=True))
    assert "fashion_mnist-32px" in table  # the Dataset column


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds} s")
