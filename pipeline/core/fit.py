"""The one training function, shared by the tune and train stages.

`fit_variant` builds the model for one strategy and seed and trains it under the one training
rule (end to end, or on cached prefix features when the strategy allows): up to `max_epochs`,
stopped once validation loss has not improved by `min_delta` for `patience` epochs, keeping
the best epoch's weights; then it checks that frozen weights did not move. Tracking comes in
as a Keras callback; this module never talks to MLflow or Optuna.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from pipeline.core import frozen_features
from pipeline.core.model import ModelSpec, build_model, compile_model, set_head_statistics, set_trainable
from pipeline.core.results import DRIFT_COLUMNS
from pipeline.core.vgg16 import FULL_BASE, block_of
from pipeline.core.weight_drift import DriftRecorder, block_drift
from pipeline.runtime.errors import PipelineError


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
    max_epochs: int
    patience: int
    min_delta: float
    batch_size: int
    seed: int
    head_norm: str
    augmentation: bool
    cache_features: bool
    jit_compile: bool
    mixed_precision: bool
    warmup_epochs: int  # head-only epochs before `trainable_layers` train (within `max_epochs`)
    lr_multipliers: tuple[tuple[str, float], ...]  # (block, factor on learning_rate)
    cut_after: str = FULL_BASE  # the base ends after this block's pooling (blocks above removed)
    parameters: str = "all"  # which parameters of `trainable_layers` train (pipeline/core/parameter_kinds.py)
    lora_rank: int = 0  # parameters: lora

    @classmethod
    def from_params(
        cls, params, variant: str, *, head_units: int, learning_rate: float, num_classes: int, seed: int
    ) -> RunConfig:
        """The run of `variant` under `params` (a pipeline.core.params.Params) with the given
        hyperparameters: the one place where the tune and train stages turn settings into a run,
        so a tune trial and a train run follow the same training rule by construction."""
        strategy, train = params.variant(variant), params.train
        return cls(
            image_size=params.data.image_size,
            num_classes=num_classes,
            trainable_layers=strategy.layers,
            cut_after=strategy.cut_after,
            parameters=strategy.parameters,
            lora_rank=strategy.lora_rank,
            pooling=params.model.pooling,
            head_units=head_units,
            dropout=params.model.dropout,
            learning_rate=learning_rate,
            max_epochs=train.max_epochs,
            patience=train.patience,
            min_delta=train.min_delta,
            head_norm=params.model.head_norm,
            batch_size=params.train.batch_size,
            seed=seed,
            augmentation=params.train.augmentation,
            cache_features=params.train.cache_features,
            jit_compile=params.train.jit_compile,
            mixed_precision=params.train.mixed_precision,
            warmup_epochs=strategy.warmup_epochs,
            lr_multipliers=strategy.multipliers,
        )

    @property
    def model_spec(self) -> ModelSpec:
        """The network this run trains."""
        return ModelSpec(
            image_size=self.image_size,
            num_classes=self.num_classes,
            trainable_layers=self.trainable_layers,
            cut_after=self.cut_after,
            pooling=self.pooling,
            head_units=self.head_units,
            dropout=self.dropout,
            augmentation=self.augmentation,
            head_norm=self.head_norm,
            parameters=self.parameters,
            lora_rank=self.lora_rank,
        )

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
    best_epoch: int  # the kept epoch: lowest validation loss (improvements of at least min_delta)
    best_val_accuracy: float  # validation accuracy of the kept epoch
    stopped_early: bool  # True when patience ran out before max_epochs
    path: str  # "cached-features (cut after <layer>)", "end-to-end" or "end-to-end (<why not cached>)"
    feature_seconds: float  # time spent computing prefix features in this run (0 on a cache hit)
    extraction_seconds: float  # what computing this run's prefix features cost, cached or not (one-time)
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
    base_weights,  # pipeline.core.weights.BaseWeights
    data: Splits,
    data_sha256: str,
    feature_cache: frozen_features.FeatureCache | None = None,
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
    # one function on purpose: the training rule (phases, early stopping across them, the frozen
    # weights check) reads as one sequence; the phase inputs and the batches are helpers
    seed_everything(config.seed)
    model = build_model(config.model_spec, base_weights.arrays)
    frozen_before = _frozen_snapshot(model)
    (x_train, y_train), val, test = data.train, data.val, data.test
    if data.train_index is not None:  # a subset of a larger pool whose features may be cached
        y_train = y_train[data.train_index]
    phases = [("warmup", frozenset(), config.warmup_epochs)] if config.warmup_epochs else []
    phases.append(("main", config.trainable_layers, config.max_epochs))
    drift = DriftRecorder(model, frozenset(block_of(name) for name in config.trainable_layers))
    recorder = _EpochRecorder(len(y_train))
    keep_best = _EarlyStopping(model.trainable_weights, config.patience, config.min_delta)  # all any phase changes
    feature_seconds, extraction_seconds, train_seconds, first_epoch, paths = 0.0, 0.0, 0.0, 0, []
    inference_batch = frozen_features.extraction_batch_size(config.image_size)
    for phase, trainable_layers, last_epoch in phases:
        set_trainable(model, trainable_layers, config.parameters)
        images = {"train": x_train, "val": val[0], "test": test[0] if test is not None else None}
        inputs, path, (seconds, one_time) = _phase_inputs(
            model, config, trainable_layers, base_weights, data_sha256, feature_cache, images, data.train_index
        )
        feature_seconds += seconds
        extraction_seconds += one_time
        paths.append(path if phase == "main" else f"warm-up {path}")
        trained = inputs.pop("model")
        if phase == phases[0][0]:  # before any step: standardise the head's input (data-dependent init)
            set_head_statistics(model, _head_inputs(trained, inputs["train"], inference_batch))
        multipliers = dict(config.lr_multipliers) if phase == "main" else None
        compile_model(
            trained, config.learning_rate, trainable_layers, config.jit_compile, multipliers, config.parameters
        )
        recorder.phase = phase
        keep_best.may_stop = phase == "main"  # the warm-up's length is part of the strategy
        start = time.perf_counter()
        trained.fit(
            batches(inputs["train"], y_train, config.batch_size, config.seed, shuffle=True),
            # evaluation batches only change speed (no BatchNormalization, dropout off): the larger
            # extraction batch runs VGG16's forward pass ~1.4x faster on CPU
            validation_data=batches(inputs["val"], val[1], inference_batch, config.seed, shuffle=False),
            initial_epoch=first_epoch,
            epochs=last_epoch,
            shuffle=False,  # the tf.data pipeline shuffles, seeded
            callbacks=[drift, recorder, keep_best, *callbacks],
            verbose=verbose,
        )
        train_seconds += time.perf_counter() - start
        first_epoch = last_epoch
        if keep_best.stopped:
            break
    keep_best.restore()
    frozen_after = _frozen_snapshot(model)
    test = inputs.get("test")
    return FitResult(
        model=model,
        history=recorder.rows,
        best_epoch=keep_best.epoch,
        best_val_accuracy=keep_best.val_accuracy,
        stopped_early=keep_best.stopped,
        path="; then ".join(paths),
        feature_seconds=feature_seconds,
        extraction_seconds=extraction_seconds,
        train_seconds=train_seconds,
        frozen_weights_unchanged=frozen_after.keys() == frozen_before.keys()
        and all(np.array_equal(frozen_before[k], v) for k, v in frozen_after.items()),
        test_probabilities=None if test is None else frozen_features.predict(trained, test, inference_batch),
        weight_drift=block_drift(model, drift.initial),
        warmup_epochs=config.warmup_epochs,
    )


def _phase_inputs(model, config, trainable_layers, base_weights, data_sha256, feature_cache, images, train_index):
    """What one training phase fits: the suffix on cached prefix features when the strategy (in
    this phase) has a frozen prefix and caching is allowed, else the whole model on images.
    Returns ({"model", "train", "val", "test"}, path description, (feature seconds spent now,
    their one-time cost whether computed now or found cached))."""
    cut = frozen_features.cut_layer(model, trainable_layers)
    use_cache = (
        config.cache_features and not config.augmentation and cut is not None and base_weights.sha256 is not None
    )
    seconds = one_time = 0.0
    if not use_cache:
        path = "end-to-end"
        if config.cache_features and config.augmentation and cut is not None:
            path += " (augmentation on: feature cache bypassed)"
        inputs = dict(images, model=model)
    else:
        split = frozen_features.split_model(model, cut)
        key = frozen_features.cache_key(data_sha256, base_weights.sha256, cut, config.image_size, config.precision)
        extraction_batch = frozen_features.extraction_batch_size(config.image_size)
        inputs = {"model": split.suffix, "test": None}
        for name, x in images.items():
            if x is None:
                continue
            if feature_cache is None:
                start = time.perf_counter()
                inputs[name] = frozen_features.predict(split.prefix, x, extraction_batch)
                spent = recorded = time.perf_counter() - start
            else:
                inputs[name], spent = feature_cache.get_or_compute(key, name, split.prefix, x, extraction_batch)
                recorded = feature_cache.extraction_seconds(key, name)
            seconds += spent
            one_time += recorded
        path = f"cached-features (cut after {cut})"
    if train_index is not None:  # pool features (or images) -> this run's subset
        inputs["train"] = np.asarray(inputs["train"][train_index])
    return inputs, path, (seconds, one_time)


STREAM_BYTES = 512 * 2**20  # inputs larger than this (as float32) are read batch by batch


def batches(x, y, batch_size: int, seed: int, shuffle: bool) -> tf.data.Dataset:
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
    """The frozen conv weights (not the head's normalisation statistics, which move by design)."""
    return {v.path: np.array(v.numpy()) for v in model.non_trainable_weights if block_of(v.path.split("/")[0])}


def _head_inputs(trained: keras.Model, train_inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """The pooled features (the head's input) of the training inputs under the initial weights."""
    layers = trained.layers[1:]  # after the InputLayer: a linear chain of shared layer objects
    end = next(i for i, layer in enumerate(layers) if layer.name in ("flatten", "gap"))
    x = inputs = keras.Input(trained.input.shape[1:])
    for layer in layers[: end + 1]:
        x = layer(x)
    return frozen_features.predict(keras.Model(inputs, x), train_inputs, batch_size)


class _EpochRecorder(keras.callbacks.Callback):
    """History rows with 1-based epochs, wall-clock timing and images seen; stops on NaN loss.

    The one clock of an epoch: its seconds also go into the epoch's logs as `epoch_seconds`, which
    the callbacks after this one (MLflow's, the progress line) read instead of timing again."""

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
        logs = {} if logs is None else logs
        logs["epoch_seconds"] = seconds  # the same dict reaches every later callback
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


class _EarlyStopping(keras.callbacks.Callback):
    """The training rule's stopping and keeping, across training phases.

    An epoch improves when its val_loss is below the best so far by more than `min_delta`; the
    values of `variables` at the last improving epoch are kept in memory (`restore()` puts them
    back). Once `patience` epochs in a row have not improved and `may_stop` is set, training
    stops (`stopped`).
    """

    def __init__(self, variables, patience: int, min_delta: float):
        super().__init__()
        self.variables = list(variables)
        self.patience, self.min_delta = patience, min_delta
        self.weights = None
        self.epoch = 0
        self.loss = math.inf
        self.val_accuracy = -math.inf
        self.may_stop = True
        self.stopped = False

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        loss = float(logs.get("val_loss", math.inf))
        if loss < self.loss - self.min_delta:
            self.loss, self.epoch = loss, epoch + 1
            self.val_accuracy = float(logs.get("val_accuracy", -math.inf))
            self.weights = [np.array(v.numpy()) for v in self.variables]
        elif self.may_stop and epoch + 1 - self.epoch >= self.patience:
            self.stopped = True
            self.model.stop_training = True

    def restore(self) -> None:
        if self.weights is not None:
            for variable, value in zip(self.variables, self.weights, strict=True):
                variable.assign(value)
