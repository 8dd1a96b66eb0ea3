"""The cached-feature fast path: run the frozen prefix of the network once, train the rest.

Without augmentation, the layers below the first trainable conv layer compute the same output
every epoch. `split_model` cuts the (linear) model there into a `prefix` (input -> last frozen
layer) and a `suffix` (that layer's output -> softmax) sharing the very same layer objects, so
training the suffix trains the full model. `FeatureCache` stores prefix outputs as float32 .npy
files keyed by (prepared data, weights, cut point): seeds and tune trials reuse them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from pipeline.core.vgg16 import CONV_LAYERS
from pipeline.runtime.atomic import atomic_path, write_json


@dataclass
class SplitModel:
    prefix: keras.Model  # frozen: images -> features at `cut`
    suffix: keras.Model  # features -> class probabilities (the trainable part)
    cut: str  # name of the last prefix layer


def cut_layer(model: keras.Model, trainable_layers: frozenset[str]) -> str | None:
    """The last layer before the first trainable conv layer; None when nothing can be cached
    (block1_conv1 trains, so every layer's input changes). Head only: the base's last pooling
    layer (`block5_pool`, or that of the block the base is cut after)."""
    first_trainable = next((name for name in CONV_LAYERS if name in trainable_layers), None)
    names = [layer.name for layer in model.layers]
    if first_trainable is None:  # head only: cut after the conv base
        return [name for name in names if name.startswith("block") and name.endswith("_pool")][-1]
    index = names.index(first_trainable)
    return None if names[index - 1] in ("image", "preprocess") else names[index - 1]


def split_model(model: keras.Model, cut: str) -> SplitModel:
    """Cut a linear functional model after layer `cut`; both halves share `model`'s layers."""
    prefix = keras.Model(model.input, model.get_layer(cut).output, name="frozen_prefix")
    layers = model.layers
    start = [layer.name for layer in layers].index(cut) + 1
    features = keras.Input(prefix.output.shape[1:], name="features")
    x = features
    for layer in layers[start:]:
        x = layer(x)
    suffix = keras.Model(features, x, name="trainable_suffix")
    return SplitModel(prefix, suffix, cut)


def cache_key(
    data_sha256: str, weights_sha256: str | None, cut: str, image_size: int, precision: str = "float32"
) -> str:
    """Features depend on the data, the weights and the cut point, nothing else (no randomness:
    a prefix is frozen and has no dropout)."""
    if weights_sha256 is None:
        raise ValueError("random-init weights change with every seed; their features cannot be shared")
    parts = [data_sha256, weights_sha256, cut, image_size, keras.__version__]
    text = json.dumps(parts if precision == "float32" else [*parts, precision])  # float32 keys stay as they were
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FeatureCache:
    """Prefix outputs on disk: `<root>/<key>/<split>.npy`, written atomically, read memory-mapped."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def get_or_compute(self, key: str, split: str, prefix: keras.Model, images: np.ndarray, batch_size: int):
        """Returns (features, seconds spent computing; 0.0 on a cache hit)."""
        path = self.root / key / f"{split}.npy"
        if path.is_file():
            return np.load(path, mmap_mode="r"), 0.0
        start = time.perf_counter()
        # batch by batch into the file: the features of a large study never sit whole in memory
        with atomic_path(path) as tmp:
            out = None
            for i in range(0, len(images), batch_size):
                batch = _apply(prefix, images[i : i + batch_size])
                if out is None:
                    out = np.lib.format.open_memmap(
                        tmp, mode="w+", dtype=np.float32, shape=(len(images), *batch.shape[1:])
                    )
                out[i : i + len(batch)] = batch
            out.flush()
            del out
        seconds = time.perf_counter() - start
        write_json(path.with_suffix(".json"), {"extraction_seconds": seconds})
        return np.load(path, mmap_mode="r"), seconds

    def extraction_seconds(self, key: str, split: str) -> float:
        """What computing these features cost when they were computed (0.0 if not recorded): the
        one-time cost a strategy's compute account includes even when it finds them cached."""
        record = self.root / key / f"{split}.json"
        return json.loads(record.read_text())["extraction_seconds"] if record.is_file() else 0.0


EXTRACTION_MEMORY = 256 * 2**20  # bytes of the largest activation (block1) per extraction batch


def extraction_batch_size(image_size: int) -> int:
    """Batch size for computing prefix features: as large as the memory budget allows (at most
    128; larger batches run the convolutions more efficiently on CPU: 1.4x at 32x32 from 32 to
    128, see reports/benchmark.md). Features do not depend on it, bit for bit (a test checks it)."""
    per_image = image_size * image_size * 64 * 4  # block1 output, float32
    return int(min(128, max(8, EXTRACTION_MEMORY // per_image)))


def predict(model: keras.Model, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """`model` applied in batches, as float32 NumPy (no Keras progress output)."""
    outputs = [_apply(model, inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outputs).astype(np.float32, copy=False)


def _apply(model: keras.Model, batch: np.ndarray) -> np.ndarray:
    return np.asarray(model(np.asarray(batch, dtype=np.float32), training=False), dtype=np.float32)
