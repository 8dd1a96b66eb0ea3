"""The three splits from the configured source (Fashion-MNIST IDX files or an image folder):
stratified, seeded, hashed; and the sample-efficiency study's pool and per-seed training subsets,
drawn the same way by every stage that trains or scores on them."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.core import data, folders, images
from pipeline.core.params import DataParams, Params

SPLITS = ("train", "val", "test")


@dataclass
class Prepared:
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (images, labels)
    class_names: list[str]
    summary: dict


def prepare(params: DataParams, seed: int) -> Prepared:
    """Build the three splits from the configured source. Raises DataError on bad data."""
    rng = np.random.default_rng(seed)
    if params.source == "fashion_mnist":
        return _prepare_fashion_mnist(params, rng)
    return _prepare_directory(params, rng)


def sample_efficiency_pool(params: Params, per_class: int) -> Prepared:
    """The sample-efficiency study's data: `data` prepared with the study's largest size (or
    `per_class`, if larger) as train_per_class. Every size and seed draws its training subset from
    this pool (`data.nested_subset`); validation and test are the same for all of them."""
    pool_size = max([per_class, *params.studies.sample_efficiency.train_per_class])
    return prepare(replace(params.data, train_per_class=pool_size), params.seed)


def study_subset(params: Params, train_labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """The rows of the pool's training split that `seed` of the sample-efficiency study trains on at
    `per_class` images per class: nested across sizes, drawn from (params.seed, seed)."""
    return data.nested_subset(train_labels, per_class, [params.seed, seed])


def _prepare_fashion_mnist(params: DataParams, rng: np.random.Generator) -> Prepared:
    folder = data.find_fashion_mnist(params.fashion_mnist_dir)
    class_names = list(data.FASHION_MNIST_CLASSES)
    pool_images, pool_labels = data.read_fashion_mnist(folder, "train")
    official_test_images, official_test_labels = data.read_fashion_mnist(folder, "test")
    # train and val come from the official training set; test only from the official test set
    counts = {"train": params.train_per_class, "val": params.val_per_class}
    picks = data.sample_per_class(pool_labels, counts, class_names, rng, "official training set")
    test_picks = data.sample_per_class(
        official_test_labels, {"test": params.test_per_class}, class_names, rng, "official test set"
    )
    splits = {split: (pool_images[picks[split]], pool_labels[picks[split]]) for split in ("train", "val")}
    splits["test"] = (official_test_images[test_picks["test"]], official_test_labels[test_picks["test"]])
    splits = {s: (data.resize_gray(images, params.image_size), labels) for s, (images, labels) in splits.items()}
    source_files = {name: _sha256_file(folder / name) for pair in data.FASHION_MNIST_FILES.values() for name in pair}
    total = sum(len(labels) for _, labels in splits.values())
    extra = {"source_files_sha256": source_files, "upscaled": total if params.image_size > 28 else 0}
    return Prepared(splits, class_names, _summary(params, splits, class_names, extra))


def _prepare_directory(params: DataParams, rng: np.random.Generator) -> Prepared:
    folder = folders.read_image_folder(Path(params.directory), params.image_size, params.skip_unreadable)
    counts = {"test": params.test_per_class, "val": params.val_per_class, "train": params.train_per_class}
    pool = "image folder (after junk, unreadable files and duplicates were left out)"
    picks = data.sample_per_class(folder.labels, counts, folder.class_names, rng, pool)
    splits = {split: (folder.pixels[picks[split]], folder.labels[picks[split]]) for split in SPLITS}
    chosen = np.sort(np.concatenate(list(picks.values())))
    conversions = Counter(kind for i in chosen for kind in folder.kinds[i])
    available = {name: int(np.sum(folder.labels == i)) for i, name in enumerate(folder.class_names)}
    extra = {
        "folder": folder.counts,
        "unreadable_skipped": folder.unreadable,
        "available_per_class": available,
        "class_imbalance": max(available.values()) / min(available.values()),
        "upscaled": int(folder.upscaled[chosen].sum()),
        "conversions": {kind: conversions[kind] for kind in images.KINDS},
    }
    return Prepared(splits, folder.class_names, _summary(params, splits, folder.class_names, extra))


def _summary(params: DataParams, splits, class_names: list[str], extra: dict) -> dict:
    counts = {
        split: {name: int(np.sum(labels == i)) for i, name in enumerate(class_names)}
        for split, (_, labels) in splits.items()
    }
    sha = {
        split: {"images": _sha256_array(images), "labels": _sha256_array(labels)}
        for split, (images, labels) in splits.items()
    }
    combined = hashlib.sha256("".join(sha[s]["images"] + sha[s]["labels"] for s in SPLITS).encode()).hexdigest()
    return {
        "source": params.source,
        "image_size": params.image_size,
        "num_classes": len(class_names),
        "class_names": class_names,
        "counts": counts,
        "totals": {split: len(labels) for split, (_, labels) in splits.items()},
        "sha256": sha,
        "data_sha256": combined,
        **extra,
    }


def _sha256_array(array: np.ndarray) -> str:
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
