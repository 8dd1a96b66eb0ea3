"""The one training function, shared by the tune and train stages.

`fit_variant` builds the model for one strategy and seed, trains it for a fixed epoch budget
(end to end, or on cached prefix features when the strategy allows), keeps the weights of the
best validation epoch and checks that frozen weights did not move. Tracking and pruning come
in as Keras callbacks; this module never talks to MLflow or Optuna.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from pipeline import features as feature_path
from pipeline.errors import PipelineError
from pipeline.model import build_model, compile_model

HISTORY_COLUMNS = (
    "epoch", "loss", "accuracy", "val_loss", "val_accuracy",
    "epoch_seconds", "cumulative_seconds", "images_seen",
)  # fmt: skip
TIMING_COLUMNS = ("epoch_seconds", "cumulative_seconds")


class NonFiniteLossError(PipelineError):
    """The training loss became NaN or infinite (a learning rate too high, usually)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run depends on, as plain values."""

    image_size: int
    num_classes: int
    trainable_layers: frozenset[str]
    pooling: str
    head_units: int
    dropout: float
    learning_rate: float
    epochs: int
    batch_size: int
    seed: int
    augmentation: bool = False
    cache_features: bool = True
    jit_compile: bool = False
    mixed_precision: bool = False

    @classmethod
    def from_params(cls, params, variant: str, *, head_units: int, learning_rate: float, num_classes: int,
                    seed: int, epochs: int) -> RunConfig:  # fmt: skip
        """The run of `variant` under `params` (a pipeline.params.Params) with the given
        hyperparameters: the one place where the tune and train stages turn settings into a run."""
        from pipeline.vgg16 import resolve_trainable

        return cls(
            image_size=params.data.image_size, num_classes=num_classes,
            trainable_layers=resolve_trainable(params.variant(variant).trainable), pooling=params.model.pooling,
            head_units=head_units, dropout=params.model.dropout, learning_rate=learning_rate, epochs=epochs,
            batch_size=params.train.batch_size, seed=seed, augmentation=params.train.augmentation,
            cache_features=params.train.cache_features, jit_compile=params.train.jit_compile,
            mixed_precision=params.train.mixed_precision,
        )  # fmt: skip

    @property
    def precision(self) -> str:
        return "mixed_bfloat16" if self.mixed_precision else "float32"


@dataclass
class Splits:
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class FitResult:
    model: keras.Model  # the full model, holding the best validation epoch's weights
    history: list[dict]  # one row per epoch, HISTORY_COLUMNS
    best_epoch: int
    best_val_accuracy: float
    path: str  # "cached-features (cut after <layer>)", "end-to-end" or "end-to-end (<why not cached>)"
    feature_seconds: float  # time spent computing prefix features (0 on a cache hit)
    train_seconds: float
    frozen_weights_unchanged: bool
    test_probabilities: np.ndarray | None = field(default=None, repr=False)


def seed_everything(seed: int) -> None:
    """Python, NumPy, TensorFlow and Keras seeds plus deterministic TF ops (identical reruns)."""
    keras.utils.set_random_seed(int(seed))  # a NumPy integer raises in Keras 3
    tf.config.experimental.enable_op_determinism()


def fit_variant(
    config: RunConfig,
    base_weights,  # pipeline.weights.BaseWeights
    data: Splits,
    data_sha256: str,
    feature_cache: feature_path.FeatureCache | None = None,
    callbacks: list[keras.callbacks.Callback] = (),
    verbose: int = 0,
) -> FitResult:
    """Train one strategy with one seed; returns the best-validation-epoch model and its history.

    Uses the cached-feature path when `config.cache_features`, no augmentation, pretrained
    weights and a frozen prefix allow it; results match the end-to-end path (a test checks it).
    Raises NonFiniteLossError when the loss becomes NaN/inf.
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(config.precision)
    try:
        return _fit(config, base_weights, data, data_sha256, feature_cache, callbacks, verbose)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _fit(config, base_weights, data, data_sha256, feature_cache, callbacks, verbose) -> FitResult:
    seed_everything(config.seed)
    model = build_model(
        image_size=config.image_size,
        num_classes=config.num_classes,
        trainable_layers=config.trainable_layers,
        base_weights=base_weights.arrays,
        pooling=config.pooling,
        head_units=config.head_units,
        dropout=config.dropout,
        augmentation=config.augmentation,
    )
    frozen_before = _frozen_snapshot(model)
    cut = feature_path.cut_layer(model, config.trainable_layers)
    use_cache = (
        config.cache_features and not config.augmentation and cut is not None and base_weights.sha256 is not None
    )
    (x_train, y_train), (x_val, y_val) = data.train, data.val
    x_test = data.test[0] if data.test is not None else None
    feature_seconds = 0.0
    if use_cache:
        split = feature_path.split_model(model, cut)
        trained = split.suffix
        key = feature_path.cache_key(data_sha256, base_weights.sha256, cut, config.image_size, config.precision)
        inputs = {}
        extraction_batch = feature_path.extraction_batch_size(config.image_size)
        for name, images in (("train", x_train), ("val", x_val), ("test", x_test)):
            if images is None:
                continue
            if feature_cache is None:
                start = time.perf_counter()
                inputs[name] = feature_path.predict(split.prefix, images, extraction_batch)
                seconds = time.perf_counter() - start
            else:
                inputs[name], seconds = feature_cache.get_or_compute(key, name, split.prefix, images, extraction_batch)
            feature_seconds += seconds
        x_train, x_val, x_test = inputs["train"], inputs["val"], inputs.get("test")
        path = f"cached-features (cut after {cut})"
    else:
        trained = model
        path = "end-to-end"
        if config.cache_features and config.augmentation and cut is not None:
            path += " (augmentation on: feature cache bypassed)"

    compile_model(trained, config.learning_rate, config.trainable_layers, jit_compile=config.jit_compile)
    recorder = _EpochRecorder(len(y_train))
    keep_best = _KeepBest()
    start = time.perf_counter()
    trained.fit(
        _batches(x_train, y_train, config.batch_size, config.seed, shuffle=True),
        validation_data=_batches(x_val, y_val, config.batch_size, config.seed, shuffle=False),
        epochs=config.epochs,
        shuffle=False,  # the tf.data pipeline shuffles, seeded
        callbacks=[recorder, keep_best, *callbacks],
        verbose=verbose,
    )
    train_seconds = time.perf_counter() - start
    if keep_best.weights is not None:
        trained.set_weights(keep_best.weights)
    frozen_after = _frozen_snapshot(model)
    frozen_unchanged = frozen_after.keys() == frozen_before.keys() and all(
        np.array_equal(frozen_before[k], v) for k, v in frozen_after.items()
    )
    test_probabilities = None
    if x_test is not None:
        test_probabilities = feature_path.predict(trained, x_test, config.batch_size)
    return FitResult(
        model=model,
        history=recorder.rows,
        best_epoch=keep_best.epoch,
        best_val_accuracy=keep_best.value,
        path=path,
        feature_seconds=feature_seconds,
        train_seconds=train_seconds,
        frozen_weights_unchanged=frozen_unchanged,
        test_probabilities=test_probabilities,
    )


STREAM_BYTES = 512 * 2**20  # inputs larger than this (as float32) are read batch by batch


def _batches(x, y, batch_size: int, seed: int, shuffle: bool) -> tf.data.Dataset:
    """Seeded, shuffled batches of (x as float32, y).

    Small inputs are copied once into a tensor. Larger ones (224x224 studies, memory-mapped
    feature caches) are streamed: the dataset shuffles *indices* and each batch reads its rows
    from `x` (for a memory map, from disk through the page cache), so host memory does not grow
    with the data. Both give the very same batches: the shuffle's random draws depend only on its
    seed and size, not on the elements (a test checks it).
    """
    if len(y) * np.prod(x.shape[1:]) * 4 <= STREAM_BYTES:
        dataset = tf.data.Dataset.from_tensor_slices((np.asarray(x, dtype=np.float32), y))
        if shuffle:
            dataset = dataset.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    labels = np.asarray(y)

    def rows(indices: np.ndarray):
        order = np.argsort(indices)  # read the memory map front to back, then restore the order
        values = np.empty((len(indices), *x.shape[1:]), dtype=np.float32)
        values[order] = x[indices[order]]
        return values, labels[indices]

    dataset = tf.data.Dataset.range(len(labels))
    if shuffle:
        dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(
        lambda indices: tf.numpy_function(rows, [indices], (tf.float32, tf.as_dtype(labels.dtype)), stateful=False)
    )
    shapes = (tf.TensorShape([None, *x.shape[1:]]), tf.TensorShape([None]))
    dataset = dataset.map(lambda xb, yb: (tf.ensure_shape(xb, shapes[0]), tf.ensure_shape(yb, shapes[1])))
    return dataset.prefetch(tf.data.AUTOTUNE)


def _frozen_snapshot(model: keras.Model) -> dict[str, np.ndarray]:
    return {v.path: np.array(v.numpy()) for v in model.non_trainable_weights}


class _EpochRecorder(keras.callbacks.Callback):
    """History rows with 1-based epochs, wall-clock timing and images seen; stops on NaN loss."""

    def __init__(self, train_size: int):
        super().__init__()
        self.train_size = train_size
        self.rows: list[dict] = []
        self._cumulative = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        self._cumulative += seconds
        logs = logs or {}
        if not math.isfinite(float(logs.get("loss", 0.0))):
            raise NonFiniteLossError(
                f"training loss became {logs.get('loss')} at epoch {epoch + 1}; lower the learning rate"
            )
        self.rows.append(
            {
                "epoch": epoch + 1,
                **{k: float(logs[k]) for k in ("loss", "accuracy", "val_loss", "val_accuracy")},
                "epoch_seconds": seconds,
                "cumulative_seconds": self._cumulative,
                "images_seen": self.train_size * (epoch + 1),
            }
        )


class _KeepBest(keras.callbacks.Callback):
    """Keeps (in memory) the weights of the epoch with the highest val_accuracy; first wins ties."""

    def __init__(self):
        super().__init__()
        self.weights = None
        self.epoch = 0
        self.value = -math.inf

    def on_epoch_end(self, epoch, logs=None):
        value = float((logs or {}).get("val_accuracy", -math.inf))
        if value > self.value:
            self.value, self.epoch = value, epoch + 1
            self.weights = [np.array(w) for w in self.model.get_weights()]
