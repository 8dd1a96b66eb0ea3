"""Raw data in, fixed-size uint8 RGB arrays out.

Two sources: Fashion-MNIST IDX files (`read_fashion_mnist`) and a folder with one sub-folder
per class (`pipeline.core.folders`). Sampling is stratified and seeded
(`sample_per_class`). Prepared splits are read back with `load_split`.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.runtime.errors import ConfigError, DataError

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # package dataset-fashion-mnist
_IDX_DTYPES = {0x08: np.uint8}


# --- Fashion-MNIST ---------------------------------------------------------------------------


def keras_dataset_dir() -> Path:
    """Where `keras.datasets.fashion_mnist` caches its files ($KERAS_HOME or ~/.keras)."""
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return Path(keras_home) / "datasets" / "fashion-mnist"


def _has_all_files(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in FASHION_MNIST_FILES.values() for name in pair)


def find_fashion_mnist(override: str | None, allow_download: bool = True) -> Path:
    """The folder holding the four Fashion-MNIST IDX files.

    Search order: `override` (data.fashion_mnist_dir), Debian's dataset-fashion-mnist package,
    the Keras dataset cache; else download through `keras.datasets` (needs the network).
    """
    if override is not None:
        folder = Path(override)
        if not _has_all_files(folder):
            wanted = ", ".join(n for pair in FASHION_MNIST_FILES.values() for n in pair)
            raise DataError(
                f"data.fashion_mnist_dir: {folder} does not hold the Fashion-MNIST IDX files ({wanted}); "
                "point it at the folder that does, or set it to null to search the usual places"
            )
        return folder
    for folder in (DEBIAN_FASHION_MNIST_DIR, keras_dataset_dir()):
        if _has_all_files(folder):
            return folder
    if not allow_download:
        raise DataError("Fashion-MNIST not found locally and downloading is disabled")
    return _download_fashion_mnist()


def _download_fashion_mnist() -> Path:
    import keras  # deferred: TensorFlow takes seconds to import and is rarely needed here

    try:
        keras.datasets.fashion_mnist.load_data()
    except Exception as error:  # get_file raises a bare Exception on network failure
        raise DataError(
            f"Fashion-MNIST is not installed and the download failed ({error}). Install it with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), copy the four IDX .gz files into "
            f"{keras_dataset_dir()}, or set data.fashion_mnist_dir"
        ) from error
    return keras_dataset_dir()


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read IDX file ({error}); re-download or reinstall it") from error
    if len(raw) < 4 or raw[0:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number); re-download or reinstall Fashion-MNIST")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(
            f"{path}: truncated IDX file ({data.size} values, header says {shape}); re-download or reinstall it"
        )
    return data.reshape(shape)


def read_fashion_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the official 'train' or 'test' split."""
    images_name, labels_name = FASHION_MNIST_FILES[split]
    images = read_idx(folder / images_name)
    labels = read_idx(folder / labels_name).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(
            f"{folder}: {images_name} and {labels_name} do not match ({images.shape}, {labels.shape}); "
            "both files must come from the same Fashion-MNIST release"
        )
    return images, labels


def resize_gray(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 (N, h, w) grayscale -> uint8 RGB (N, size, size, 3), bilinear."""
    out = np.empty((len(images), image_size, image_size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        resized = Image.fromarray(image, mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(resized)[..., None]
    return out


# --- sampling --------------------------------------------------------------------------------


def sample_per_class(
    labels: np.ndarray, counts: dict[str, int], class_names: list[str], rng: np.random.Generator, pool: str
) -> dict[str, np.ndarray]:
    """Disjoint, stratified, seeded index sets: {split: indices}, `counts[split]` per class.

    Raises DataError when a class has fewer items than the splits need together.
    """
    needed = sum(counts.values())
    chosen: dict[str, list[np.ndarray]] = {split: [] for split in counts}
    for class_index, class_name in enumerate(class_names):
        members = np.flatnonzero(labels == class_index)
        if len(members) < needed:
            wanted = " + ".join(f"data.{split}_per_class {n}" for split, n in counts.items())
            raise DataError(
                f"class {class_name!r} has {len(members)} images in the {pool}, fewer than the {needed} "
                f"every class needs ({wanted}); lower those keys so that they sum to at most "
                f"{len(members)}, or add images to that class"
            )
        members = rng.permutation(members)
        start = 0
        for split, n in counts.items():
            chosen[split].append(members[start : start + n])
            start += n
    # sort so arrays are in a stable order independent of class iteration; shuffled in training
    return {split: np.sort(np.concatenate(parts)) for split, parts in chosen.items()}


def nested_subset(labels: np.ndarray, per_class: int, seeds: list[int]) -> np.ndarray:
    """Sorted row indices: the first `per_class` of each class in a shuffle seeded by `seeds`.
    The shuffle does not depend on `per_class`, so smaller sizes are subsets of larger ones."""
    rng = np.random.default_rng(seeds)
    parts = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < per_class:
            problem = f"{per_class} per class, but the pool holds only {len(members)} of class {label}"
            raise ConfigError("studies.sample_efficiency.train_per_class", problem)
        parts.append(members[:per_class])
    return np.sort(np.concatenate(parts))


# --- prepared splits -------------------------------------------------------------------------


def load_split(prepared_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, s, s, 3), labels int64 (N,)) of a prepared split."""
    path = Path(prepared_dir) / f"{split}.npz"
    if not path.is_file():
        raise DataError(f"{path} not found; run the prepare stage first (`dvc repro prepare`)")
    with np.load(path) as arrays:
        return arrays["images"], arrays["labels"]


def load_summary(prepared_dir: Path) -> dict:
    """The prepare stage's summary.json (class names, counts, data_sha256)."""
    path = Path(prepared_dir) / "summary.json"
    if not path.is_file():
        raise DataError(f"{path} not found; run the prepare stage first (`dvc repro prepare`)")
    return json.loads(path.read_text())
