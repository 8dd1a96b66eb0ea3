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
from pipeline.drift import DRIFT_COLUMNS, DriftRecorder, block_drift
from pipeline.errors import PipelineError
from pipeline.model import build_model, compile_model, set_trainable
from pipeline.vgg16 import block_of

HISTORY_COLUMNS = (
    "epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy",
    "epoch_seconds", "cumulative_seconds", "images_seen", *DRIFT_COLUMNS,
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
    warmup_epochs: int = 0  # head-only epochs before `trainable_layers` train (within `epochs`)
    lr_multipliers: tuple[tuple[str, float], ...] = ()  # (block, factor on learning_rate)

    @classmethod
    def from_params(cls, params, variant: str, *, head_units: int, learning_rate: float, num_classes: int,
                    seed: int, epochs: int) -> RunConfig:  # fmt: skip
        """The run of `variant` under `params` (a pipeline.params.Params) with the given
        hyperparameters: the one place where the tune and train stages turn settings into a run."""
        from pipeline.vgg16 import resolve_trainable

        strategy = params.variant(variant)
        return cls(
            image_size=params.data.image_size, num_classes=num_classes,
            trainable_layers=resolve_trainable(strategy.trainable), pooling=params.model.pooling,
            head_units=head_units, dropout=params.model.dropout, learning_rate=learning_rate, epochs=epochs,
            batch_size=params.train.batch_size, seed=seed, augmentation=params.train.augmentation,
            cache_features=params.train.cache_features, jit_compile=params.train.jit_compile,
            mixed_precision=params.train.mixed_precision, warmup_epochs=strategy.warmup_epochs,
            lr_multipliers=strategy.multipliers,
        )  # fmt: skip

    @property
    def precision(self) -> str:
        return "mixed_bfloat16" if self.mixed_precision else "float32"


@dataclass
class Splits:
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray] | None = None
    # train on these rows of `train` only: features of the whole pool are computed (and cached)
    # once and shared by every subset (the sample-efficiency study)
    train_index: np.ndarray | None = None


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
    weight_drift: dict[str, float] = field(default_factory=dict)  # block -> ||W - W0|| / ||W0||, final model
    warmup_epochs: int = 0  # epochs 1..warmup_epochs trained the head only


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
    (x_train, y_train), val, test = data.train, data.val, data.test
    if data.train_index is not None:  # a subset of a larger pool whose features may be cached
        y_train = y_train[data.train_index]
    phases = [("warmup", frozenset(), config.warmup_epochs)] if config.warmup_epochs else []
    phases.append(("main", config.trainable_layers, config.epochs))
    drift = DriftRecorder(model, frozenset(block_of(name) for name in config.trainable_layers))
    recorder = _EpochRecorder(len(y_train))
    keep_best = _KeepBest(model.trainable_weights)  # the spec's weights: all that any phase can change
    feature_seconds, train_seconds, first_epoch, paths = 0.0, 0.0, 0, []
    for phase, trainable_layers, last_epoch in phases:
        set_trainable(model, trainable_layers)
        inputs, path, seconds = _phase_inputs(
            model, config, trainable_layers, base_weights, data_sha256, feature_cache,
            {"train": x_train, "val": val[0], "test": test[0] if test is not None else None}, data.train_index,
        )  # fmt: skip
        feature_seconds += seconds
        paths.append(path if phase == "main" else f"warm-up {path}")
        trained = inputs.pop("model")
        multipliers = dict(config.lr_multipliers) if phase == "main" else None
        compile_model(trained, config.learning_rate, trainable_layers, config.jit_compile, multipliers)
        recorder.phase = phase
        start = time.perf_counter()
        trained.fit(
            _batches(inputs["train"], y_train, config.batch_size, config.seed, shuffle=True),
            validation_data=_batches(inputs["val"], val[1], config.batch_size, config.seed, shuffle=False),
            initial_epoch=first_epoch,
            epochs=last_epoch,
            shuffle=False,  # the tf.data pipeline shuffles, seeded
            callbacks=[drift, recorder, keep_best, *callbacks],
            verbose=verbose,
        )
        train_seconds += time.perf_counter() - start
        first_epoch = last_epoch
    keep_best.restore()
    frozen_after = _frozen_snapshot(model)
    frozen_unchanged = frozen_after.keys() == frozen_before.keys() and all(
        np.array_equal(frozen_before[k], v) for k, v in frozen_after.items()
    )
    test_probabilities = None
    if inputs.get("test") is not None:
        test_probabilities = feature_path.predict(trained, inputs["test"], config.batch_size)
    return FitResult(
        model=model,
        history=recorder.rows,
        best_epoch=keep_best.epoch,
        best_val_accuracy=keep_best.value,
        path="; then ".join(paths),
        feature_seconds=feature_seconds,
        train_seconds=train_seconds,
        frozen_weights_unchanged=frozen_unchanged,
        test_probabilities=test_probabilities,
        weight_drift=block_drift(model, drift.initial),
        warmup_epochs=config.warmup_epochs,
    )


def _phase_inputs(model, config, trainable_layers, base_weights, data_sha256, feature_cache, images, train_index):
    """What one training phase fits: the suffix on cached prefix features when the strategy (in
    this phase) has a frozen prefix and caching is allowed, else the whole model on images.
    Returns ({"model", "train", "val", "test"}, path description, feature seconds)."""
    cut = feature_path.cut_layer(model, trainable_layers)
    use_cache = (
        config.cache_features and not config.augmentation and cut is not None and base_weights.sha256 is not None
    )
    seconds = 0.0
    if not use_cache:
        path = "end-to-end"
        if config.cache_features and config.augmentation and cut is not None:
            path += " (augmentation on: feature cache bypassed)"
        inputs = dict(images, model=model)
    else:
        split = feature_path.split_model(model, cut)
        key = feature_path.cache_key(data_sha256, base_weights.sha256, cut, config.image_size, config.precision)
        extraction_batch = feature_path.extraction_batch_size(config.image_size)
        inputs = {"model": split.suffix, "test": None}
        for name, x in images.items():
            if x is None:
                continue
            if feature_cache is None:
                start = time.perf_counter()
                inputs[name] = feature_path.predict(split.prefix, x, extraction_batch)
                spent = time.perf_counter() - start
            else:
                inputs[name], spent = feature_cache.get_or_compute(key, name, split.prefix, x, extraction_batch)
            seconds += spent
        path = f"cached-features (cut after {cut})"
    if train_index is not None:  # pool features (or images) -> this run's subset
        inputs["train"] = np.asarray(inputs["train"][train_index])
    return inputs, path, seconds


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
        self.phase = "main"
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
                "phase": self.phase,
                **{k: float(logs[k]) for k in ("loss", "accuracy", "val_loss", "val_accuracy")},
                "epoch_seconds": seconds,
                "cumulative_seconds": self._cumulative,
                "images_seen": self.train_size * (epoch + 1),
                **{k: float(logs.get(k, 0.0)) for k in DRIFT_COLUMNS},
            }
        )


class _KeepBest(keras.callbacks.Callback):
    """Keeps (in memory) the values of `variables` at the epoch with the highest val_accuracy
    (first wins ties), across training phases; `restore()` puts them back."""

    def __init__(self, variables):
        super().__init__()
        self.variables = list(variables)
        self.weights = None
        self.epoch = 0
        self.value = -math.inf

    def on_epoch_end(self, epoch, logs=None):
        value = float((logs or {}).get("val_accuracy", -math.inf))
        if value > self.value:
            self.value, self.epoch = value, epoch + 1
            self.weights = [np.array(v.numpy()) for v in self.variables]

    def restore(self) -> None:
        if self.weights is not None:
            for variable, value in zip(self.variables, self.weights, strict=True):
                variable.assign(value)
