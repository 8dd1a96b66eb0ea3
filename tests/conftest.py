"""Shared fixtures: shrink the real params.yaml and generate tiny datasets on disk."""

from __future__ import annotations

import copy
import gzip
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests import param_reads

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]


def merge(base: dict, override: dict) -> dict:
    """A copy of `base` with `override` merged in, recursively (dict values merge, others replace)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def default_raw_params() -> dict:
    """The repository's params.yaml as a plain mapping."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture
def write_params(tmp_path, default_raw_params):
    """write_params(override) -> path of a params file: the real defaults with `override` merged."""

    def write(override: dict | None = None, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(merge(default_raw_params, override or {}), sort_keys=False))
        return path

    return write


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format (gzipped), as Fashion-MNIST ships it."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_mnist_dir(tmp_path) -> Path:
    """A Fashion-MNIST-format folder: 10 classes, 12 train and 6 test images each, 28x28.

    Each image's pixels encode (split, index) so tests can trace where an image came from.
    """
    folder = tmp_path / "fmnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, per_class, prefix in (("train", 12, "train"), ("test", 6, "t10k")):
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = 0 if split == "train" else 255  # split marker, survives as a corner value
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Three classes of 8 images each in mixed formats and colour modes, plus one corrupt file
    and one non-image file in class 'cat'."""
    from PIL import Image

    root = tmp_path / "images"
    rng = np.random.default_rng(1)
    formats = [("png", "RGB"), ("jpg", "L"), ("bmp", "RGB"), ("gif", "P"), ("png", "RGBA"), ("png", "L")]
    for class_name in ("cat", "dog", "fox"):
        (root / class_name).mkdir(parents=True)
        for i in range(8):
            suffix, mode = formats[i % len(formats)]
            size = (20, 24) if i == 0 else (40, 36)  # one image smaller than 32 px: upscaled
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            image = Image.fromarray(pixels, "RGB")
            image = image.convert("P") if mode == "P" else image.convert(mode)
            image.save(root / class_name / f"{class_name}_{i}.{suffix}")
    good = (root / "cat" / "cat_0.png").read_bytes()
    (root / "cat" / "broken.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


TINY_OVERRIDE = {
    "data": {"train_per_class": 2, "val_per_class": 1, "test_per_class": 2},
    "train": {"max_epochs": 2, "patience": 1, "seeds": [1, 2], "batch_size": 8},
    "model": {"head_units": 8},
    "tune": {"n_trials": 3, "head_units": [0, 8], "startup_trials": 2, "halving_epoch": 0},
}  # fmt: skip


def make_tiny_project(root: Path, variants: dict, override: dict | None = None) -> tuple[Path, Path]:
    """Tiny Fashion-MNIST-format data (10 classes, 28x28), a shrunk copy of the real params
    with only `variants`, and the prepared splits. Returns (params path, prepared folder)."""
    from pipeline.core.params import load_params
    from pipeline.core.splits import prepare
    from pipeline.stages.prepare import write_prepared

    folder = root / "fmnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        labels = np.repeat(np.arange(10), n)
        write_idx(
            folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        )
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    raw = merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_OVERRIDE)
    raw = merge(raw, {"data": {"fashion_mnist_dir": str(folder)}, **(override or {})})
    raw["variants"] = variants
    raw["report"]["baseline"] = next(iter(variants))
    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(params_path)
    write_prepared(prepare(params.data, params.seed), root / "prepared")
    return params_path, root / "prepared"


def as_from_a_terminal() -> None:
    """`preexec_fn` for a process a test interrupts with SIGINT: the disposition a command typed in a
    terminal has. A test runner started in the background (`cmd &`, nohup, some CI runners) has
    SIGINT ignored, its children inherit that, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(**options: object) -> list[str]:
    """Command-line options from keywords: `cli(variant="frozen", feature_cache=path, worker=True)`
    is `["--variant", "frozen", "--feature-cache", path, "--worker"]`."""
    args: list[object] = []
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}"] + ([] if value is True else [value])
    return args


STAGES = ("prepare", "baselines", "predict", "tune", "train", "register", "report")


def stage_command(module: str, *args: object) -> list[str]:
    """`python -m pipeline.stages.<module> ARGS` (a stage's name) or `python -m pipeline.<module> ARGS`
    (a tool: "tools.bench") with the tests' interpreter: as a user runs it."""
    dotted = f"stages.{module}" if module in STAGES else module
    return [sys.executable, "-m", f"pipeline.{dotted}", *map(str, args)]


def run_stage(module: str, *args: object, env: dict | None = None, timeout: int = 600, **kwargs):
    """Run a stage in a subprocess from the repository root, its output captured (the one helper
    every test that starts a stage uses)."""
    return subprocess.run(
        stage_command(module, *args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )


# every stage process a test starts with `stage_env` records the params it reads here; the
# session's last test (test_params_declared.py) checks them against dvc.yaml
PARAMS_READS = Path(tempfile.mkdtemp(prefix="params-reads-"))


def stage_env(root: Path) -> dict:
    """The environment for a stage subprocess: its own SQLite MLflow store under `root`, and the
    params recorder on (tests/param_reads.py)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    env.pop("DVC_ROOT", None)
    return param_reads.environment(PARAMS_READS, env)


def pytest_collection_modifyitems(items):
    """The check of what this session's stage processes read runs after all of them."""
    items[:] = sorted(items, key=lambda item: item.nodeid.startswith("tests/test_params_declared.py"))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(PARAMS_READS, ignore_errors=True)


@pytest.fixture(scope="session")
def hed():
    """The embedded pretrained VGG16 conv weights (loaded once per test session)."""
    from pipeline.core.weights import load_base_weights

    return load_base_weights("hed")


def colour_splits(seed: int, train_per_class: int):
    """Splits of 3 classes with a learnable signal (class = dominant colour channel), 32x32:
    `train_per_class`, 4 validation and 4 test images per class."""
    from pipeline.core.fit import Splits

    rng = np.random.default_rng(seed)

    def make(n_per_class):
        labels = np.repeat(np.arange(3), n_per_class)
        images = rng.integers(0, 90, size=(len(labels), 32, 32, 3))
        images[np.arange(len(labels)), :, :, labels] += 150
        return images.astype(np.uint8), labels.astype(np.int64)

    return Splits(make(train_per_class), make(4), make(4))


def run_config(spec, **overrides):
    """A RunConfig for `colour_splits` training the layers `spec`; `overrides` change any field."""
    from pipeline.core.fit import RunConfig
    from pipeline.core.vgg16 import resolve_trainable

    values = dict(
        image_size=32,
        num_classes=3,
        trainable_layers=resolve_trainable(spec),
        pooling="flatten",
        head_units=16,
        dropout=0.2,
        learning_rate=3e-4,
        max_epochs=3,
        patience=100,
        min_delta=0.0,
        batch_size=8,
        seed=5,
        head_norm="none",
        augmentation=False,
        cache_features=True,
        jit_compile=False,
        mixed_precision=False,
        warmup_epochs=0,
        lr_multipliers=(),
    )
    return RunConfig(**{**values, **overrides})
