"""Benchmark measurements that run in the benchmark's own process: the machine's dense-math peak,
the VGG16 forward pass, naive `model.fit` against the pipeline's `fit_variant` per strategy, FLOP
bounds, tune trials per minute, and the options that change numerics. `pipeline.tools.bench` calls them;
timings are never tests."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from pipeline.core.params import Params

# ------------------------------------------------------------------ helpers


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def timed(function, repeats: int) -> tuple[dict, object]:
    """Call `function` `repeats` times; (stats of the wall seconds, the last result)."""
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
    return stats(seconds), result


class MemorySampler:
    """Peak anonymous (heap) and file-backed (page cache, e.g. memory maps) resident memory of
    this process, sampled from /proc every 50 ms while the `with` block runs."""

    def __init__(self):
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()

    @staticmethod
    def now() -> dict:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    values[key] = int(rest.split()[0]) / 1024  # MB
        return values

    def _run(self):
        while not self._stop.is_set():
            for key, value in self.now().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(0.05)

    def __enter__(self):
        self.before = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------ compute


def matmul_flops(n: int, repeats: int) -> dict:
    """FLOP/s of a float32 n x n matmul: the machine's practical peak for dense math."""
    import tensorflow as tf

    a = tf.random.stateless_normal((n, n), seed=(1, 2))
    b = tf.random.stateless_normal((n, n), seed=(3, 4))
    tf.linalg.matmul(a, b).numpy()  # warm-up
    seconds, _ = timed(lambda: tf.linalg.matmul(a, b).numpy(), repeats)
    flop = 2 * n**3
    return {"n": n, "seconds": seconds, "gflops": flop / seconds["median"] / 1e9}


def layer_flops(model) -> dict[str, int]:
    """Forward FLOPs per image of each Conv2D and Dense layer (2 x multiply-adds; 'same'
    padding computes every output position)."""
    import keras

    out = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, c_out = layer.output.shape
            k_h, k_w, c_in, _ = layer.kernel.shape
            out[layer.name] = 2 * height * width * k_h * k_w * c_in * c_out
        elif isinstance(layer, keras.layers.Dense):
            out[layer.name] = 2 * int(np.prod(layer.kernel.shape))
    return out


def conv_flops(model) -> dict[str, int]:
    from pipeline.core.vgg16 import CONV_LAYERS

    return {name: flops for name, flops in layer_flops(model).items() if name in CONV_LAYERS}


def forward_throughput(params: Params, weights, images: np.ndarray, matmul: dict, repeats: int) -> dict:
    from pipeline.core.frozen_features import extraction_batch_size, predict, split_model
    from pipeline.core.model import ModelSpec, build_model

    model = build_model(
        ModelSpec(image_size=params.data.image_size, num_classes=10, trainable_layers=frozenset()), weights.arrays
    )
    base = split_model(model, "block5_pool").prefix
    flops = sum(conv_flops(model).values())
    rows, reference = [], None
    for batch_size in sorted({params.train.batch_size, extraction_batch_size(params.data.image_size)}):
        predict(base, images[:batch_size], batch_size)  # trace once
        seconds, output = timed(lambda bs=batch_size: predict(base, images, bs), repeats)
        reference = output if reference is None else reference
        per_second = len(images) / seconds["median"]
        rows.append(
            {
                "batch_size": batch_size,
                "images": len(images),
                "seconds": seconds,
                "images_per_second": per_second,
                "efficiency": per_second * flops / (matmul["gflops"] * 1e9),
                "identical_to_first": bool(np.array_equal(output, reference)),
            }
        )
    return {"image_size": params.data.image_size, "gflop_per_image": flops / 1e9, "batches": rows}


# ------------------------------------------------------------------ strategies


def _config(params: Params, variant: str, num_classes: int, seed: int, epochs: int):
    """The strategy's run at the default hyperparameters for exactly `epochs` epochs (patience
    beyond the budget: a timing compares equal epoch counts)."""
    import dataclasses

    from pipeline.core.fit import RunConfig

    config = RunConfig.from_params(
        params,
        variant,
        head_units=params.model.head_units,
        learning_rate=params.train.learning_rate,
        num_classes=num_classes,
        seed=seed,
    )
    return dataclasses.replace(config, max_epochs=epochs, patience=epochs + 1)


def naive_fit(config, weights, splits) -> tuple[float, list[float]]:
    """The tutorial way: the whole Keras model, frozen layers marked non-trainable, `model.fit`
    on NumPy arrays, then predict the test set. Returns (run seconds, per-epoch seconds)."""
    import keras

    from pipeline.core.fit import seed_everything
    from pipeline.core.frozen_features import predict
    from pipeline.core.model import build_model, compile_model
    from pipeline.core.vgg16 import FULL_BASE

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epochs.append(time.perf_counter() - self.start)

    epochs: list[float] = []
    start = time.perf_counter()
    seed_everything(config.seed)
    # the naive baseline as measured so far: the whole base, whatever the strategy's cut (see reports/benchmark.md)
    model = build_model(dataclasses.replace(config.model_spec, augmentation=False, cut_after=FULL_BASE), weights.arrays)
    compile_model(model, config.learning_rate, config.trainable_layers, parameters=config.parameters)
    (x_train, y_train), (x_val, y_val) = splits.train, splits.val
    model.fit(
        x_train.astype(np.float32),
        y_train,
        batch_size=config.batch_size,
        epochs=config.max_epochs,
        validation_data=(x_val.astype(np.float32), y_val),
        callbacks=[EpochTimer()],
        verbose=0,
    )
    predict(model, splits.test[0], config.batch_size)
    return time.perf_counter() - start, epochs


TIMED_EPOCHS = 5  # per timed run: enough epochs for a median after the first (tracing) one


def strategy_timings(params: Params, weights_for, splits, data_sha: str, num_classes: int, cache_root: Path) -> list:
    """Per strategy: the naive full-model fit vs the pipeline's `fit_variant` (cold feature cache,
    then warm: a second seed reusing the features), over TIMED_EPOCHS epochs."""
    import keras

    from pipeline.core.fit import fit_variant
    from pipeline.core.frozen_features import FeatureCache

    rows = []
    epochs = TIMED_EPOCHS
    for variant in params.variants:
        weights = weights_for(variant)
        config = _config(params, variant, num_classes, seed=1, epochs=epochs)
        keras.backend.clear_session()
        naive_run, naive_epochs = naive_fit(config, weights, splits)
        keras.backend.clear_session()
        cache = FeatureCache(cache_root / variant)
        start = time.perf_counter()
        cold = fit_variant(config, weights, splits, data_sha, cache)
        cold_run = time.perf_counter() - start
        warm_run = None
        if cold.path.startswith("cached"):
            keras.backend.clear_session()
            start = time.perf_counter()
            fit_variant(_config(params, variant, num_classes, seed=2, epochs=epochs), weights, splits, data_sha, cache)
            warm_run = time.perf_counter() - start
        pipeline_epochs = [row["epoch_seconds"] for row in cold.history]
        row = {
            "variant": variant,
            "path": cold.path,
            "epochs": epochs,
            "naive_epoch": stats(naive_epochs[1:]),
            "pipeline_epoch": stats(pipeline_epochs[1:]),
            "naive_first_epoch": naive_epochs[0],
            "pipeline_first_epoch": pipeline_epochs[0],
            "naive_run": naive_run,
            "pipeline_run_cold": cold_run,
            "pipeline_run_warm": warm_run,
            "feature_seconds": cold.feature_seconds,
        }
        row["epoch_speedup"] = row["naive_epoch"]["median"] / row["pipeline_epoch"]["median"]
        row["run_speedup_cold"] = naive_run / cold_run
        row["run_speedup_warm"] = naive_run / warm_run if warm_run else None
        row["budget"] = _budget(params, variant, row)
        rows.append(row)
        print(
            f"[bench] {variant}: epoch {row['naive_epoch']['median']:.2f}s naive vs "
            f"{row['pipeline_epoch']['median']:.2f}s pipeline ({row['epoch_speedup']:.1f}x)",
            flush=True,
        )
    return rows


def _budget(params: Params, variant: str, row: dict) -> dict:
    """The strategy's whole default budget in a `dvc repro` (tune trials + seeds) at its upper
    bound (every run to train.max_epochs), naive vs the pipeline, estimated from the measured
    per-epoch, per-run and feature-extraction times: the pipeline extracts features once per
    strategy, the naive way recomputes them every epoch."""
    runs = params.tune.n_trials + len(params.train.seeds)
    epochs = runs * params.train.max_epochs
    naive_overhead = row["naive_run"] - row["epochs"] * row["naive_epoch"]["median"]
    naive = runs * naive_overhead + epochs * row["naive_epoch"]["median"]
    cached = row["pipeline_run_warm"] is not None
    pipeline_overhead = (row["pipeline_run_warm"] if cached else row["pipeline_run_cold"]) - row["epochs"] * row[
        "pipeline_epoch"
    ]["median"]
    pipeline = row["feature_seconds"] + runs * pipeline_overhead + epochs * row["pipeline_epoch"]["median"]
    return {
        "runs": runs,
        "epochs": epochs,
        "naive_seconds": naive,
        "pipeline_seconds": pipeline,
        "speedup": naive / pipeline,
    }


def flop_bound(params: Params, num_classes: int, splits) -> dict[str, float]:
    """Per strategy, the largest epoch speed-up caching can give: FLOPs of a naive epoch (forward
    of every layer for train + val images, backward of the trainable ones for train images) over
    FLOPs of a pipeline epoch (the same, for the layers after the cut only). A layer's backward
    costs about 2x its forward (input and weight gradients)."""
    from pipeline.core.frozen_features import cut_layer
    from pipeline.core.model import ModelSpec, build_model

    n_train, n_val = len(splits.train[1]), len(splits.val[1])
    out = {}
    for variant in params.variants:
        trainable = params.variant(variant).layers
        model = build_model(
            ModelSpec(
                image_size=params.data.image_size,
                num_classes=num_classes,
                trainable_layers=trainable,
                pooling=params.model.pooling,
                head_units=params.model.head_units,
                dropout=0.0,
                augmentation=False,
                head_norm="none",
            ),
            None,
        )
        flops = layer_flops(model)
        names = [layer.name for layer in model.layers]
        trained = {name for name in flops if name in trainable or name not in conv_flops(model)}  # + the head
        cut = cut_layer(model, trainable)
        cached = cut is not None and params.variant_weights(variant) != "none"
        suffix = [name for name in flops if not cached or names.index(name) > names.index(cut)]

        cost = {n: (n_train + n_val + (2 * n_train if n in trained else 0)) * f for n, f in flops.items()}
        out[variant] = sum(cost.values()) / sum(cost[n] for n in suffix)
    return out


# ------------------------------------------------------------------ tuning


def _warm_feature_cache(params: Params, variant: str, context: dict) -> None:
    """Compute the strategy's cached features before timing trials, so that neither study pays
    the one-time extraction."""
    from pipeline.core.fit import RunConfig
    from pipeline.core.frozen_features import cache_key, cut_layer, extraction_batch_size, split_model
    from pipeline.core.model import ModelSpec, build_model

    weights = context["weights"]
    config = RunConfig.from_params(
        params, variant, head_units=0, learning_rate=1e-4, num_classes=len(context["class_names"]), seed=0
    )
    cut = cut_layer(
        build_model(
            ModelSpec(
                image_size=config.image_size, num_classes=config.num_classes, trainable_layers=config.trainable_layers
            ),
            None,
        ),
        config.trainable_layers,
    )
    if cut is None or weights.sha256 is None or not config.cache_features:
        return
    model = build_model(
        ModelSpec(
            image_size=config.image_size, num_classes=config.num_classes, trainable_layers=config.trainable_layers
        ),
        weights.arrays,
    )
    prefix = split_model(model, cut).prefix
    key = cache_key(context["data_sha256"], weights.sha256, cut, config.image_size, config.precision)
    for split, (images, _) in (("train", context["splits"].train), ("val", context["splits"].val)):
        context["cache"].get_or_compute(key, split, prefix, images, extraction_batch_size(config.image_size))


def tune_rates(params: Params, prepared: Path, cache_root: Path, n_trials: int) -> list:
    """Per strategy, `n_trials` trials of the real tune objective (in-memory Optuna storage, MLflow
    runs in a temporary store, the default sampler and training rule, features from the warm
    cache): seconds, trials per minute and epochs trained until early stopping."""
    import mlflow
    import optuna

    from pipeline.stack import optuna_study, tracking
    from pipeline.stages.tune import Objective, trial_context

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune = params.tune
    rows = []
    with tempfile.TemporaryDirectory() as store:
        tracking.connect(f"sqlite:///{store}/mlflow.db", "bench")
        for variant in params.variants:
            context = trial_context(params, variant, prepared, str(cache_root / variant))
            _warm_feature_cache(params, variant, context)
            search = params.learning_rate_range(variant)
            points = optuna_study.design(tune.design_seed, variant, list(tune.head_units), search, n_trials)
            study = optuna_study.load_or_create(
                optuna.storages.InMemoryStorage(),
                variant,
                sampler=optuna_study.BudgetSampler(tune.design_seed, points),
                pruner=optuna_study.HalvingPruner(0, tune.halving_factor),  # rates under the whole rule
            )
            with mlflow.start_run(run_name=f"bench/{variant}") as parent:
                objective = Objective(params, variant, context, parent.info.run_id)
                start = time.perf_counter()
                study.optimize(objective, n_trials=n_trials)
                seconds = time.perf_counter() - start
            epochs_run = sum(t.user_attrs.get("epochs_run", 0) for t in study.trials)
            rows.append(
                {
                    "variant": variant,
                    "trials": n_trials,
                    "seconds": seconds,
                    "trials_per_minute": 60 * n_trials / seconds,
                    "epochs_run": epochs_run,
                }
            )
            print(
                f"[bench] tune {variant}: {rows[-1]['trials_per_minute']:.1f} trials/min, {epochs_run} epochs",
                flush=True,
            )
    return rows


# ------------------------------------------------------------------ options that change numerics


def numerics_options(params: Params, weights_for, splits, data_sha: str, num_classes: int, epochs: int) -> list:
    """Seconds per epoch and validation accuracy of `fit_variant` with XLA or bfloat16 mixed
    precision against the default float32 run, for the end-to-end `full` strategy (where the
    options matter most) and the cached `partial` one; same seed, same data."""
    import dataclasses

    import keras

    from pipeline.core.fit import fit_variant

    rows = []
    for variant in [v for v in ("full", "partial") if v in params.variants]:
        base = _config(params, variant, num_classes, seed=1, epochs=epochs)
        reference = None
        for label, config in (
            ("float32", base),
            ("jit_compile", dataclasses.replace(base, jit_compile=True)),
            ("mixed_bfloat16", dataclasses.replace(base, mixed_precision=True)),
        ):
            keras.backend.clear_session()
            result = fit_variant(config, weights_for(variant), splits, data_sha, None)
            val = [row["val_accuracy"] for row in result.history]
            reference = reference or val
            change = max(abs(a - b) for a, b in zip(val, reference, strict=True))
            epoch = stats([row["epoch_seconds"] for row in result.history][1:])
            rows.append(
                {
                    "variant": variant,
                    "option": label,
                    "epoch": epoch,
                    "val_accuracy": val,
                    "max_val_accuracy_change": change,
                }
            )
            print(f"[bench] {variant} {label}: {rows[-1]['epoch']['median']:.2f} s/epoch", flush=True)
    return rows
