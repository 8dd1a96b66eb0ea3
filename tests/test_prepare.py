"""The prepare stage on generated data: shapes, dtypes, balance, disjoint splits, determinism,
and clean failures that leave no outputs behind."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.data import read_idx, sample_per_class
from pipeline.core.params import load_params
from pipeline.core.splits import prepare
from pipeline.runtime.errors import DataError
from pipeline.stages.prepare import write_prepared
from tests.conftest import run_stage, write_idx


def _fmnist_params(write_params, folder, **data):
    return load_params(
        write_params(
            {
                "data": {
                    "source": "fashion_mnist",
                    "fashion_mnist_dir": str(folder),
                    "train_per_class": 5,
                    "val_per_class": 3,
                    "test_per_class": 4,
                    "image_size": 32,
                    **data,
                }
            }
        )
    )


def test_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)


def test_truncated_idx_is_reported(tmp_path):
    write_idx(tmp_path / "a.gz", np.zeros((4, 5, 5), np.uint8))
    import gzip

    with gzip.open(tmp_path / "a.gz") as f:
        raw = f.read()
    with gzip.open(tmp_path / "b.gz", "wb") as f:
        f.write(raw[:-7])
    with pytest.raises(DataError, match="truncated IDX"):
        read_idx(tmp_path / "b.gz")


def test_fashion_mnist_splits_have_shapes_dtypes_and_balance(write_params, fashion_mnist_dir):
    params = _fmnist_params(write_params, fashion_mnist_dir)
    prepared = prepare(params.data, params.seed)
    expected = {"train": 5, "val": 3, "test": 4}
    for split, per_class in expected.items():
        images, labels = prepared.splits[split]
        assert images.shape == (10 * per_class, 32, 32, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int64
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
        # grayscale -> RGB: the three channels are identical
        np.testing.assert_array_equal(images[..., 0], images[..., 2])
    assert prepared.summary["counts"]["val"]["Bag"] == 3
    assert prepared.class_names[9] == "Ankle boot"


def test_fashion_mnist_test_split_comes_only_from_official_test_set(write_params, fashion_mnist_dir):
    params = _fmnist_params(write_params, fashion_mnist_dir)
    prepared = prepare(params.data, params.seed)
    # the fixture marks pixel (0, 0) as 0 in the official train set and 255 in the test set;
    # bilinear resizing keeps the corner pixel of a 28 -> 32 upscale exact
    assert (prepared.splits["test"][0][:, 0, 0, 0] == 255).all()
    assert (prepared.splits["train"][0][:, 0, 0, 0] == 0).all()
    assert (prepared.splits["val"][0][:, 0, 0, 0] == 0).all()


def test_splits_are_disjoint_and_seeded():
    labels = np.repeat(np.arange(3), 10)
    counts = {"train": 4, "val": 3, "test": 3}
    picks = sample_per_class(labels, counts, ["a", "b", "c"], np.random.default_rng(7), "pool")
    all_indices = np.concatenate(list(picks.values()))
    assert len(all_indices) == len(set(all_indices.tolist())) == 30
    again = sample_per_class(labels, counts, ["a", "b", "c"], np.random.default_rng(7), "pool")
    other = sample_per_class(labels, counts, ["a", "b", "c"], np.random.default_rng(8), "pool")
    assert all(np.array_equal(picks[s], again[s]) for s in counts)
    assert not all(np.array_equal(picks[s], other[s]) for s in counts)


def test_same_seed_gives_identical_arrays_and_hashes(write_params, fashion_mnist_dir):
    params = _fmnist_params(write_params, fashion_mnist_dir)
    first, second = prepare(params.data, params.seed), prepare(params.data, params.seed)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(first.splits[split][0], second.splits[split][0])
    assert first.summary["sha256"] == second.summary["sha256"]
    other = prepare(params.data, params.seed + 1)
    assert other.summary["data_sha256"] != first.summary["data_sha256"]


def test_requesting_more_than_exists_names_the_class_and_count(write_params, fashion_mnist_dir):
    params = _fmnist_params(write_params, fashion_mnist_dir, train_per_class=10, val_per_class=5)
    with pytest.raises(
        DataError, match=r"class 'T-shirt/top' has 12 images in the official training set, fewer than the 15"
    ):
        prepare(params.data, params.seed)


def test_image_folder_with_mixed_formats_skips_and_counts_corrupt_files(write_params, image_folder):
    params = load_params(
        write_params(
            {
                "data": {
                    "source": "directory",
                    "directory": str(image_folder),
                    "skip_unreadable": True,
                    "train_per_class": 4,
                    "val_per_class": 2,
                    "test_per_class": 2,
                    "image_size": 32,
                }
            }
        )
    )
    prepared = prepare(params.data, params.seed)
    assert prepared.class_names == ["cat", "dog", "fox"]
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        images, labels = prepared.splits[split]
        assert images.shape == (3 * n, 32, 32, 3) and images.dtype == np.uint8
        assert np.bincount(labels).tolist() == [n, n, n]
    assert prepared.summary["unreadable_skipped"] == ["cat/broken.png"]
    assert prepared.summary["folder"]["non_image_files"] == 1
    assert prepared.summary["upscaled"] == 3  # the one 20x24 image of each class


def test_corrupt_image_fails_by_default_and_lists_it(write_params, image_folder):
    params = load_params(
        write_params(
            {
                "data": {
                    "source": "directory",
                    "directory": str(image_folder),
                    "train_per_class": 4,
                    "val_per_class": 2,
                    "test_per_class": 2,
                }
            }
        )
    )
    with pytest.raises(DataError, match=r"(?s)1 image file\(s\).*cat/broken.png.*skip_unreadable: true"):
        prepare(params.data, params.seed)


def test_single_class_folder_is_rejected(write_params, image_folder):
    import shutil

    shutil.rmtree(image_folder / "dog")
    shutil.rmtree(image_folder / "fox")
    params = load_params(write_params({"data": {"source": "directory", "directory": str(image_folder)}}))
    with pytest.raises(DataError, match="at least 2"):
        prepare(params.data, params.seed)


def test_written_outputs_round_trip(tmp_path, write_params, fashion_mnist_dir):
    params = _fmnist_params(write_params, fashion_mnist_dir)
    prepared = prepare(params.data, params.seed)
    out = tmp_path / "prepared"
    write_prepared(prepared, out)
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "summary.json", "test.npz", "train.npz", "val.npz"]
    with np.load(out / "val.npz") as arrays:
        np.testing.assert_array_equal(arrays["images"], prepared.splits["val"][0])
    assert json.loads((out / "classes.json").read_text()) == prepared.class_names
    assert json.loads((out / "summary.json").read_text())["totals"] == {"train": 50, "val": 30, "test": 40}


def _run_prepare(params_path, out):
    return run_stage("prepare", "--params", params_path, "--out", out, timeout=120)


def test_cli_writes_outputs(tmp_path, write_params, fashion_mnist_dir):
    params_path = write_params(
        {
            "data": {
                "fashion_mnist_dir": str(fashion_mnist_dir),
                "train_per_class": 5,
                "val_per_class": 3,
                "test_per_class": 4,
            }
        }
    )
    result = _run_prepare(params_path, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "50 train / 30 val / 40 test" in result.stdout
    assert (tmp_path / "out" / "summary.json").is_file()


def test_cli_bad_input_exits_2_with_message_and_leaves_previous_outputs(tmp_path, write_params, image_folder):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier run's output must survive a failed run
    params_path = write_params({"data": {"source": "directory", "directory": str(image_folder)}})
    result = _run_prepare(params_path, out)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "cat/broken.png" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))) == ["out"]
    assert (out / "summary.json").read_text() == "{}"


def test_cli_missing_directory_names_it(tmp_path, write_params):
    params_path = write_params({"data": {"source": "directory", "directory": str(tmp_path / "nope")}})
    result = _run_prepare(params_path, tmp_path / "out")
    assert result.returncode == 2
    assert "does not exist" in result.stderr and str(tmp_path / "nope") in result.stderr
    assert not (tmp_path / "out").exists()
