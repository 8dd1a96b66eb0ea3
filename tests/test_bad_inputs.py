"""The bad-input catalogue: one test per input, each through a real entry point.

Every rejection must exit with status 2, print one `error: ...` paragraph that names the
problem and the fix (no traceback), and leave no declared output behind, not even a temporary
one. Inputs the pipeline accepts with a count (non-image files, small images, skipped corrupt
files) must show that count in the output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, cli, make_tiny_project, merge, run_stage, stage_command, stage_env

PYTHON = sys.executable


def run_module(module: str, *args: object, env: dict | None = None, timeout: int = 600, **kwargs):
    return run_stage(module, *args, env=env or stage_env(Path(tempfile.gettempdir())), timeout=timeout, **kwargs)


def error_message(proc: subprocess.CompletedProcess) -> str:
    """The `error: ...` paragraph of a rejected run, after checking status and form."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    # the stage's line starts with `error: ` (TensorFlow's own log lines may contain the word too)
    found = re.search(r"(?m)^error: ", proc.stderr)
    assert found, proc.stderr[-2000:]
    message = proc.stderr[found.start() :].rstrip("\n")
    assert "\n\n" not in message, f"more than one paragraph:\n{message}"
    return message


def assert_rejected(proc, *fragments: str) -> str:
    message = error_message(proc)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    return message


def assert_nothing_written(folder: Path) -> None:
    """No output and no temporary sibling of it (atomic writes leave `.<name>.*.tmp` on failure)."""
    assert not folder.exists(), f"{folder} was written"
    if folder.parent.exists():
        leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
        assert not leftovers, leftovers


# ---------------------------------------------------------------- params.yaml (through prepare)


def test_params(tmp_path):
    """The exit-2 contract for params.yaml: every rule is a unit test in tests/test_params.py; here
    one of them through a stage process: status 2, one `error:` paragraph naming the key and the
    fix, no traceback, nothing written."""
    raw = merge(yaml.safe_load((REPO / "params.yaml").read_text()), {"data": {"image_sise": 32}})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "prepared"
    proc = run_module("prepare", "--params", path, "--out", out)
    assert_rejected(proc, "data.image_sise: unknown key", "did you mean 'data.image_size'")
    assert_nothing_written(out)


def test_tune_storage_database_unreachable(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params, prepared = make_tiny_project(
        tmp_path,
        {"frozen": {"trainable": "none"}},
        {"tune": {"storage": f"postgresql://optuna@127.0.0.1:{port}/optuna"}},
    )
    out = tmp_path / "tune"
    proc = run_module(
        "tune",
        *cli(variant="frozen", params=params, prepared=prepared, out=out, feature_cache=tmp_path / "cache"),
        env=stage_env(tmp_path),
    )
    assert_rejected(
        proc,
        f"tune.storage postgresql://optuna@127.0.0.1:{port}/optuna: cannot open the study database",
        "Connection refused",
        "make team-up",
        "PGPASSWORD",
    )
    assert_nothing_written(out / "best_params.json")


def _valid_params_text() -> str:
    return (REPO / "params.yaml").read_text()


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        pytest.param(
            lambda: _valid_params_text().replace("  image_size: 32", "  image_size: [32", 1).encode(),
            ["YAML syntax error", "line ", "opened at line", "fix the YAML there"], id="yaml_syntax_error",
        ),
        pytest.param(
            lambda: _valid_params_text().replace("  image_size: 32", "\timage_size: 32", 1).encode(),
            ["a tab in the indentation", "replace the tab with spaces"], id="tab_indentation",
        ),
        pytest.param(
            lambda: _valid_params_text().replace("  image_size: 32", "  image_size: 32\n  image_size: 64", 1).encode(),
            ["duplicate key 'image_size'", "silently keep only the last one", "delete one of them"],
            id="duplicate_key",
        ),
        pytest.param(
            lambda: (_valid_params_text() + "\nseed: 7\n").encode(),
            ["duplicate key 'seed' (first at line", "delete one of them"], id="duplicate_top_level_section",
        ),
        pytest.param(lambda: b"- seed\n- data\n", ["holds a YAML list, not a mapping", "git checkout"], id="a_list"),
        pytest.param(lambda: b"42\n", ["holds a YAML int, not a mapping"], id="a_scalar"),
        pytest.param(lambda: b"", ["the file is empty", "git checkout -- params.yaml"], id="empty_file"),
        pytest.param(lambda: b"# only a comment\n", ["the file is empty (or only comments)"], id="only_comments"),
        pytest.param(
            lambda: _valid_params_text().replace("# Every setting", "# \u00c9very setting", 1).encode("latin-1"),
            ["line 1: byte 0xc9 is not UTF-8 text", "save the file as UTF-8"], id="not_utf8",
        ),
    ],
)  # fmt: skip
def test_params_file_malformed(tmp_path, content, fragments):
    path = tmp_path / "params.yaml"
    path.write_bytes(content())
    out = tmp_path / "prepared"
    message = assert_rejected(run_module("prepare", "--params", path, "--out", out), str(path), *fragments)
    assert message.count("\n") == 0  # one line: file, line and fix together
    assert_nothing_written(out)


def test_params_error_through_dvc_repro(tmp_path):
    """The same message reaches the user through `dvc repro`, and DVC records no stage as done."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "dvc.yaml", repo / "dvc.yaml")
    raw = merge(yaml.safe_load((REPO / "params.yaml").read_text()), {"data": {"image_sise": 32}})
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=repo, env=env, check=True, capture_output=True)
    proc = subprocess.run(["dvc", "repro", "prepare"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error: data.image_sise: unknown key; did you mean 'data.image_size'?" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (repo / "dvc.lock").exists()
    assert_nothing_written(repo / "data" / "prepared")


# ---------------------------------------------------------------- data (through prepare)


def _prepare_folder(tmp_path, write_params, folder: Path, **data) -> tuple[subprocess.CompletedProcess, Path]:
    counts = {"train_per_class": 4, "val_per_class": 2, "test_per_class": 2}
    params = write_params({"data": {"source": "directory", "directory": str(folder), **counts, **data}})
    out = tmp_path / "prepared"
    return run_module("prepare", "--params", params, "--out", out), out


def test_data_missing_directory(tmp_path, write_params):
    proc, out = _prepare_folder(tmp_path, write_params, tmp_path / "no-such-folder")
    assert_rejected(proc, f"data.directory: {tmp_path / 'no-such-folder'} does not exist", "one sub-folder per class")
    assert_nothing_written(out)


def test_data_fashion_mnist_dir_without_the_files(tmp_path, write_params):
    (tmp_path / "empty").mkdir()
    params = write_params({"data": {"fashion_mnist_dir": str(tmp_path / "empty")}})
    proc = run_module("prepare", "--params", params, "--out", tmp_path / "prepared")
    assert_rejected(
        proc,
        f"data.fashion_mnist_dir: {tmp_path / 'empty'} does not hold the Fashion-MNIST IDX files",
        "train-images-idx3-ubyte.gz",
        "set it to null",
    )
    assert_nothing_written(tmp_path / "prepared")


def test_data_fashion_mnist_file_truncated(tmp_path, write_params, fashion_mnist_dir):
    import gzip

    path = fashion_mnist_dir / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    params = write_params(
        {
            "data": {
                "fashion_mnist_dir": str(fashion_mnist_dir),
                "train_per_class": 2,
                "val_per_class": 1,
                "test_per_class": 2,
            }
        }
    )
    proc = run_module("prepare", "--params", params, "--out", tmp_path / "prepared")
    assert_rejected(proc, f"{path}: truncated IDX file", "re-download or reinstall it")
    assert_nothing_written(tmp_path / "prepared")


def test_data_empty_class_folder(tmp_path, write_params, image_folder):
    (image_folder / "owl").mkdir()
    proc, out = _prepare_folder(tmp_path, write_params, image_folder, skip_unreadable=True)
    assert_rejected(proc, f"class folder {image_folder / 'owl'} has no readable images", "add images or remove")
    assert_nothing_written(out)


def test_data_single_class(tmp_path, write_params, image_folder):
    for name in ("dog", "fox"):
        shutil.rmtree(image_folder / name)
    proc, out = _prepare_folder(tmp_path, write_params, image_folder, skip_unreadable=True)
    assert_rejected(proc, "has 1 class folder(s); a classifier needs at least 2")
    assert_nothing_written(out)


def test_data_non_image_files_are_ignored_and_counted(tmp_path, write_params, image_folder):
    (image_folder / "cat" / "broken.png").unlink()  # leave only the non-image file as the odd one out
    (image_folder / "dog" / "README").write_text("class notes")
    proc, out = _prepare_folder(tmp_path, write_params, image_folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folder"]["non_image_files"] == 2
    assert summary["totals"] == {"train": 12, "val": 6, "test": 6}


def test_data_corrupt_image_stops_with_the_file_and_the_switch(tmp_path, write_params, image_folder):
    proc, out = _prepare_folder(tmp_path, write_params, image_folder)
    assert_rejected(proc, "1 image file(s)", "cannot be decoded", "cat/broken.png", "skip_unreadable: true")
    assert_nothing_written(out)


def test_data_corrupt_image_skipped_and_counted_when_asked(tmp_path, write_params, image_folder):
    proc, out = _prepare_folder(tmp_path, write_params, image_folder, skip_unreadable=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unreadable_skipped"] == ["cat/broken.png"]


def test_data_more_images_requested_than_exist(tmp_path, write_params, image_folder):
    proc, out = _prepare_folder(tmp_path, write_params, image_folder, skip_unreadable=True, train_per_class=20)
    assert_rejected(
        proc,
        "class 'cat' has 8 images in the image folder (after junk, unreadable files and duplicates",
        "fewer than the 24 every class needs (data.test_per_class 2 + data.val_per_class 2 + data.train_per_class 20)",
        "sum to at most 8",
    )
    assert_nothing_written(out)


def test_data_images_smaller_than_image_size_are_upscaled_and_counted(tmp_path, write_params, image_folder):
    # every class has exactly one 20x24 image; 4 + 2 + 2 = all 8 images per class are used
    proc, out = _prepare_folder(tmp_path, write_params, image_folder, skip_unreadable=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["upscaled"] == 3


# ---------------------------------------------------------------- weights, tracking, training (through train)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A prepared tiny project; tests write their own params next to it."""
    root = tmp_path_factory.mktemp("tiny")
    params_path, prepared = make_tiny_project(root, {"frozen": {"trainable": "none"}}, {"train": {"seeds": [1]}})
    return yaml.safe_load(params_path.read_text()), prepared


def _train(tmp_path, tiny, override: dict, env: dict | None = None, **kwargs):
    raw, prepared = tiny
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(merge(raw, override), sort_keys=False))
    out = tmp_path / "results" / "train" / "frozen"
    proc = run_module(
        "train",
        *cli(variant="frozen", params=params, prepared=prepared, out=out, feature_cache=tmp_path / "cache"),
        env=env or stage_env(tmp_path),
        **kwargs,
    )
    return proc, out


def _weights(path) -> dict:
    return {"variants": {"frozen": {"trainable": "none", "weights": str(path)}}}


def test_weights_imagenet_while_offline(tmp_path, tiny):
    env = {
        **stage_env(tmp_path),
        "KERAS_HOME": str(tmp_path / "keras"),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    proc, out = _train(tmp_path, tiny, _weights("imagenet"), env=env)
    assert_rejected(
        proc,
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "could not be downloaded",
        f"Copy the file into {tmp_path / 'keras'}/models/",
        "use `model.weights: hed` (offline)",
    )
    assert_nothing_written(out)


def test_weights_file_missing(tmp_path, tiny):
    missing = tmp_path / "absent.weights.h5"
    proc, out = _train(tmp_path, tiny, _weights(missing))
    assert_rejected(proc, f"weights file {missing} does not exist", "or use hed")
    assert_nothing_written(out)


def test_weights_file_corrupt(tmp_path, tiny):
    corrupt = tmp_path / "corrupt.weights.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"truncated" * 10)
    proc, out = _train(tmp_path, tiny, _weights(corrupt))
    assert_rejected(proc, str(corrupt), "could not be loaded into VGG16")
    assert_nothing_written(out)


def test_weights_file_of_another_architecture(tmp_path, tiny):
    import keras

    other = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3, name="conv")])
    path = tmp_path / "resnet-ish.weights.h5"
    other.save_weights(path)
    proc, out = _train(tmp_path, tiny, _weights(path))
    assert_rejected(proc, str(path), "could not be loaded into VGG16")
    assert_nothing_written(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_unreachable_mlflow_server(tmp_path, tiny):
    uri = f"http://127.0.0.1:{_free_port()}"
    proc, out = _train(tmp_path, tiny, {}, env={**stage_env(tmp_path), "MLFLOW_TRACKING_URI": uri})
    assert_rejected(proc, f"MLflow tracking server {uri} is not reachable", "Start it", "MLFLOW_TRACKING_URI")
    assert "train/frozen/seed-1" not in proc.stdout  # failed before the first run started
    assert_nothing_written(out)


def _read_only(folder: Path) -> list[str]:
    """Make `folder` read-only for a stage subprocess; returns the command prefix that does it.

    Root ignores permission bits, so as root the stage runs in its own mount namespace with
    `folder` bind-mounted read-only (a read-only file system, as on a shared results volume).
    """
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    prefix = ["unshare", "--mount", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder)]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"running as root without mount namespaces, no way to make a folder read-only: {probe.stderr}")
    return prefix


@pytest.mark.parametrize("stage", ["prepare", "train"])
def test_tracking_read_only_results_folder(tmp_path, tiny, stage):
    raw, prepared = tiny
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    results = tmp_path / "results"
    results.mkdir()
    prefix = _read_only(results)
    try:
        if stage == "prepare":
            args = ["prepare", "--params", params, "--out", results / "prepared"]
        else:
            args = [
                "train",
                "--variant",
                "frozen",
                "--params",
                params,
                "--prepared",
                prepared,
                "--out",
                results / "train" / "frozen",
                "--feature-cache",
                tmp_path / "cache",
            ]
        command = [*prefix, *stage_command(*args)]
        proc = subprocess.run(command, cwd=REPO, env=stage_env(tmp_path), capture_output=True, text=True, timeout=600)
        target = results if stage == "prepare" else results / "train"
        assert_rejected(
            proc, f"cannot write into {target} (", "make it writable", "or choose another folder with --out"
        )
        assert list(results.iterdir()) == []
    finally:
        results.chmod(0o755)


def test_training_loss_becomes_nan(tmp_path, tiny):
    """Adam with a step of 1e38 overflows the head's activations in the first step."""
    from mlflow.tracking import MlflowClient

    proc, out = _train(tmp_path, tiny, {"train": {"learning_rate": 1.0e38}})
    assert_rejected(proc, "training loss became nan at epoch 1", "lower the learning rate")
    assert_nothing_written(out)
    client = MlflowClient(stage_env(tmp_path)["MLFLOW_TRACKING_URI"])
    [experiment] = [e for e in client.search_experiments() if e.name == tiny[0]["mlflow"]["experiment"]]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "train/frozen/seed-1"
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith("NonFiniteLossError: training loss became nan at epoch 1")
