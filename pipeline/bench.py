"""Benchmark: where the time goes, measured in one process, on this machine, on the prepared data.

  python -m pipeline.bench                # compute, strategies, a large study (about 10 min)
  python -m pipeline.bench --end-to-end   # clean `dvc repro` in a temporary copy, no-op repro,
                                          # wall time and peak memory per stage (about 20 min)
  python -m pipeline.bench --numerics     # XLA and bfloat16 against float32 (about 5 min)
  python -m pipeline.bench --tune         # tune trials/min with and without pruning (about 7 min)

Writes reports/benchmark.json, benchmark_e2e.json, benchmark_numerics.json or benchmark_tune.json, then renders
reports/benchmark.md from whichever exist (each part says when and at which commit it ran). Every timed figure is a
median with min and max over its repetitions (the count is in the table). Timings are never
tests; this script is where they live.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from pipeline.atomic import ensure_writable, write_json, write_text
from pipeline.cli import run_stage
from pipeline.params import Params, load_params

REPO = Path(__file__).resolve().parents[1]


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
    from pipeline.vgg16 import CONV_LAYERS

    return {name: flops for name, flops in layer_flops(model).items() if name in CONV_LAYERS}


def forward_throughput(params: Params, weights, images: np.ndarray, matmul: dict, repeats: int) -> dict:
    from pipeline.features import extraction_batch_size, predict, split_model
    from pipeline.model import build_model

    model = build_model(
        image_size=params.data.image_size, num_classes=10, trainable_layers=frozenset(), base_weights=weights.arrays
    )
    base = split_model(model, "block5_pool").prefix
    flops = sum(conv_flops(model).values())
    rows, reference = [], None
    for batch_size in sorted({params.train.batch_size, extraction_batch_size(params.data.image_size)}):
        predict(base, images[:batch_size], batch_size)  # trace once
        seconds, output = timed(lambda bs=batch_size: predict(base, images, bs), repeats)
        reference = output if reference is None else reference
        per_second = len(images) / seconds["median"]
        rows.append({
            "batch_size": batch_size, "images": len(images), "seconds": seconds, "images_per_second": per_second,
            "efficiency": per_second * flops / (matmul["gflops"] * 1e9),
            "identical_to_first": bool(np.array_equal(output, reference)),
        })  # fmt: skip
    return {"image_size": params.data.image_size, "gflop_per_image": flops / 1e9, "batches": rows}


# ------------------------------------------------------------------ strategies


def _config(params: Params, variant: str, num_classes: int, seed: int, epochs: int):
    from pipeline.training import RunConfig

    return RunConfig.from_params(
        params, variant, head_units=params.model.head_units, learning_rate=params.train.learning_rate,
        num_classes=num_classes, seed=seed, epochs=epochs,
    )  # fmt: skip


def naive_fit(config, weights, splits) -> tuple[float, list[float]]:
    """The tutorial way: the whole Keras model, frozen layers marked non-trainable, `model.fit`
    on NumPy arrays, then predict the test set. Returns (run seconds, per-epoch seconds)."""
    import keras

    from pipeline.features import predict
    from pipeline.model import build_model, compile_model
    from pipeline.training import seed_everything

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epochs.append(time.perf_counter() - self.start)

    epochs: list[float] = []
    start = time.perf_counter()
    seed_everything(config.seed)
    model = build_model(
        image_size=config.image_size, num_classes=config.num_classes, trainable_layers=config.trainable_layers,
        base_weights=weights.arrays, pooling=config.pooling, head_units=config.head_units, dropout=config.dropout,
    )  # fmt: skip
    compile_model(model, config.learning_rate, config.trainable_layers)
    (x_train, y_train), (x_val, y_val) = splits.train, splits.val
    model.fit(
        x_train.astype(np.float32), y_train, batch_size=config.batch_size, epochs=config.epochs,
        validation_data=(x_val.astype(np.float32), y_val), callbacks=[EpochTimer()], verbose=0,
    )  # fmt: skip
    predict(model, splits.test[0], config.batch_size)
    return time.perf_counter() - start, epochs


def strategy_timings(params: Params, weights_for, splits, data_sha: str, num_classes: int, cache_root: Path) -> list:
    """Per strategy: the naive full-model fit vs the pipeline's `fit_variant` (cold feature cache,
    then warm: a second seed reusing the features), over the default epoch budget."""
    import keras

    from pipeline.features import FeatureCache
    from pipeline.training import fit_variant

    rows = []
    epochs = params.train.epochs
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
            "variant": variant, "path": cold.path, "epochs": epochs,
            "naive_epoch": stats(naive_epochs[1:]), "pipeline_epoch": stats(pipeline_epochs[1:]),
            "naive_first_epoch": naive_epochs[0], "pipeline_first_epoch": pipeline_epochs[0],
            "naive_run": naive_run, "pipeline_run_cold": cold_run, "pipeline_run_warm": warm_run,
            "feature_seconds": cold.feature_seconds,
        }  # fmt: skip
        row["epoch_speedup"] = row["naive_epoch"]["median"] / row["pipeline_epoch"]["median"]
        row["run_speedup_cold"] = naive_run / cold_run
        row["run_speedup_warm"] = naive_run / warm_run if warm_run else None
        row["budget"] = _budget(params, row)
        rows.append(row)
        print(f"[bench] {variant}: epoch {row['naive_epoch']['median']:.2f}s naive vs "
              f"{row['pipeline_epoch']['median']:.2f}s pipeline ({row['epoch_speedup']:.1f}x)", flush=True)  # fmt: skip
    return rows


def _budget(params: Params, row: dict) -> dict:
    """The strategy's whole default budget in a `dvc repro` (tune trials + seeds), naive vs the
    pipeline, estimated from the measured per-epoch, per-run and feature-extraction times: the
    pipeline extracts features once per strategy, the naive way recomputes them every epoch."""
    runs = params.tune.n_trials + len(params.train.seeds)
    epochs = params.tune.n_trials * params.tune.epochs + len(params.train.seeds) * params.train.epochs
    naive_overhead = row["naive_run"] - row["epochs"] * row["naive_epoch"]["median"]
    naive = runs * naive_overhead + epochs * row["naive_epoch"]["median"]
    cached = row["pipeline_run_warm"] is not None
    pipeline_overhead = (row["pipeline_run_warm"] if cached else row["pipeline_run_cold"]) - row["epochs"] * row[
        "pipeline_epoch"
    ]["median"]
    pipeline = row["feature_seconds"] + runs * pipeline_overhead + epochs * row["pipeline_epoch"]["median"]
    return {"runs": runs, "epochs": epochs, "naive_seconds": naive, "pipeline_seconds": pipeline,
            "speedup": naive / pipeline}  # fmt: skip


def flop_bound(params: Params, num_classes: int, splits) -> dict[str, float]:
    """Per strategy, the largest epoch speed-up caching can give: FLOPs of a naive epoch (forward
    of every layer for train + val images, backward of the trainable ones for train images) over
    FLOPs of a pipeline epoch (the same, for the layers after the cut only). A layer's backward
    costs about 2x its forward (input and weight gradients)."""
    from pipeline.features import cut_layer
    from pipeline.model import build_model
    from pipeline.vgg16 import resolve_trainable

    n_train, n_val = len(splits.train[1]), len(splits.val[1])
    out = {}
    for variant in params.variants:
        trainable = resolve_trainable(params.variant(variant).trainable)
        model = build_model(
            image_size=params.data.image_size, num_classes=num_classes, trainable_layers=trainable,
            base_weights=None, pooling=params.model.pooling, head_units=params.model.head_units,
        )  # fmt: skip
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
    from pipeline.features import cache_key, cut_layer, extraction_batch_size, split_model
    from pipeline.model import build_model
    from pipeline.training import RunConfig

    weights = context["weights"]
    config = RunConfig.from_params(params, variant, head_units=0, learning_rate=1e-4,
                                   num_classes=len(context["class_names"]), seed=0, epochs=1)  # fmt: skip
    cut = cut_layer(
        build_model(image_size=config.image_size, num_classes=config.num_classes,
                    trainable_layers=config.trainable_layers, base_weights=None),
        config.trainable_layers,
    )  # fmt: skip
    if cut is None or weights.sha256 is None or not config.cache_features:
        return
    model = build_model(image_size=config.image_size, num_classes=config.num_classes,
                        trainable_layers=config.trainable_layers, base_weights=weights.arrays)  # fmt: skip
    prefix = split_model(model, cut).prefix
    key = cache_key(context["data_sha256"], weights.sha256, cut, config.image_size, config.precision)
    for split, (images, _) in (("train", context["splits"].train), ("val", context["splits"].val)):
        context["cache"].get_or_compute(key, split, prefix, images, extraction_batch_size(config.image_size))


def tune_rates(params: Params, prepared: Path, cache_root: Path, n_trials: int, epochs: int) -> list:
    """Trials per minute of the real tune objective (in-memory Optuna storage, MLflow runs in a
    temporary store) without a pruner and with a median pruner that may stop a trial after its
    first epoch once one trial has completed; features come from the warm cache."""
    import mlflow
    import optuna

    from pipeline import study as studies
    from pipeline import tracking
    from pipeline.tune import Objective, _context

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    small = params.tune.__class__(**{**vars(params.tune), "n_trials": n_trials, "epochs": epochs})
    bench_params = params.__class__(**{**vars(params), "tune": small})
    rows = []
    with tempfile.TemporaryDirectory() as store:
        tracking.connect(f"sqlite:///{store}/mlflow.db", "bench")
        for variant in params.variants:
            context = _context(bench_params, variant, prepared, str(cache_root / variant))
            _warm_feature_cache(bench_params, variant, context)
            row = {"variant": variant, "trials": n_trials, "epochs_per_trial": epochs}
            for label, pruner in (
                ("unpruned", optuna.pruners.NopPruner()),
                ("pruned", optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)),
            ):
                # with at most `sampler_startup_trials` trials both studies draw the same random
                # hyperparameters: they differ only in what pruning stops
                study = studies.load_or_create(
                    optuna.storages.InMemoryStorage(), f"{variant}-{label}", seed=params.seed,
                    startup_trials=max(small.sampler_startup_trials, n_trials), pruner=pruner,
                )  # fmt: skip
                with mlflow.start_run(run_name=f"bench/{variant}/{label}") as parent:
                    objective = Objective(bench_params, variant, context, parent.info.run_id, 0)
                    start = time.perf_counter()
                    study.optimize(objective, n_trials=n_trials)
                    seconds = time.perf_counter() - start
                epochs_run = sum(t.user_attrs.get("epochs_run", 0) for t in study.trials)
                row[label] = {"seconds": seconds, "trials_per_minute": 60 * n_trials / seconds,
                              "epochs_run": epochs_run}  # fmt: skip
            print(f"[bench] tune {variant}: {row['pruned']['trials_per_minute']:.1f} trials/min pruned, "
                  f"{row['unpruned']['trials_per_minute']:.1f} unpruned", flush=True)  # fmt: skip
            rows.append(row)
    return rows


# ------------------------------------------------------------------ streaming a large study


def large_study(params: Params, images_total: int, image_size: int, work: Path, train_images: int) -> dict:
    """Disk needed by the feature caches of a `image_size` study of `images_total` images, and a
    synthetic run: the frozen strategy's cached features of that study written to a memory-mapped
    file, then one epoch of head training streamed from it, with peak memory sampled."""

    from pipeline.features import cut_layer, split_model
    from pipeline.model import build_model, compile_model
    from pipeline.training import STREAM_BYTES, _batches, seed_everything
    from pipeline.vgg16 import resolve_trainable

    model = build_model(image_size=image_size, num_classes=10, trainable_layers=frozenset(), base_weights=None)
    disk = {}
    for variant in params.variants:
        cut = cut_layer(model, resolve_trainable(params.variant(variant).trainable))
        if cut is None or params.variant_weights(variant) == "none":
            disk[variant] = None
            continue
        shape = split_model(model, cut).prefix.output.shape[1:]
        disk[variant] = {"cut": cut, "shape": list(shape), "gb": images_total * int(np.prod(shape)) * 4 / 1e9}
    free_gb = shutil.disk_usage(work).free / 1e9

    shape = tuple(split_model(model, "block5_pool").prefix.output.shape[1:])
    path = work / "synthetic_features.npy"
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(train_images, *shape))
    for i in range(0, train_images, 500):
        features[i : i + 500] = np.maximum(rng.standard_normal((min(500, train_images - i), *shape)), 0)
    features.flush()
    del features
    write_seconds = time.perf_counter() - start
    features = np.load(path, mmap_mode="r")
    labels = rng.integers(0, 10, size=train_images)
    seed_everything(0)
    full = build_model(
        image_size=image_size, num_classes=10, trainable_layers=frozenset(), base_weights=None,
        pooling=params.model.pooling, head_units=params.model.head_units, dropout=params.model.dropout,
    )  # fmt: skip
    head = split_model(full, "block5_pool").suffix  # what the frozen strategy trains on cached features
    compile_model(head, params.train.learning_rate, frozenset())
    dataset = _batches(features, labels, params.train.batch_size, 0, shuffle=True)
    with MemorySampler() as memory:
        start = time.perf_counter()
        head.fit(dataset, epochs=1, verbose=0)
        epoch_seconds = time.perf_counter() - start
    path.unlink()
    per_image = per_image_seconds(params, image_size)
    return {
        "per_image": per_image, "study": FULL_STUDY, "study_cost": study_cost(per_image, FULL_STUDY),
        "images": images_total, "image_size": image_size, "disk": disk, "disk_free_gb": free_gb,
        "synthetic": {
            "train_images": train_images, "shape": list(shape), "file_gb": train_images * int(np.prod(shape)) * 4 / 1e9,
            "write_seconds": write_seconds, "epoch_seconds": epoch_seconds,
            "streamed": train_images * int(np.prod(shape)) * 4 > STREAM_BYTES,
            "rss_anon_before_mb": memory.before["RssAnon"], "rss_anon_peak_mb": memory.peak["RssAnon"],
            "rss_file_before_mb": memory.before["RssFile"], "rss_file_peak_mb": memory.peak["RssFile"],
        },
    }  # fmt: skip


# A study worth running on a GPU, costed on this machine from measured per-image seconds
FULL_STUDY = {"train_per_class": 700, "val_per_class": 150, "test_per_class": 150, "classes": 10, "epochs": 20,
              "seeds": 5, "tune_trials": 20, "tune_epochs": 5}  # fmt: skip


def per_image_seconds(params: Params, image_size: int, batch: int = 8, repeats: int = 2) -> dict:
    """Measured seconds per image at `image_size`: a training step and a forward pass of the part
    of the model each strategy runs (the whole model end to end, or the suffix after the cut on
    features of the right shape), batches of `batch`, median of `repeats` after a warm-up."""
    import keras
    import tensorflow as tf

    from pipeline.features import cut_layer, split_model
    from pipeline.model import build_model, compile_model
    from pipeline.vgg16 import resolve_trainable

    out = {}
    for variant in params.variants:
        trainable = resolve_trainable(params.variant(variant).trainable)
        keras.backend.clear_session()
        model = build_model(
            image_size=image_size, num_classes=10, trainable_layers=trainable, base_weights=None,
            pooling=params.model.pooling, head_units=params.model.head_units, dropout=params.model.dropout,
        )  # fmt: skip
        cut = cut_layer(model, trainable)
        cached = cut is not None and params.variant_weights(variant) != "none"
        part = split_model(model, cut).suffix if cached else model
        compile_model(part, 1e-4, trainable)
        x = tf.random.stateless_uniform((batch, *part.input.shape[1:]), seed=(1, 2), maxval=255.0)
        y = tf.zeros((batch,), dtype=tf.int64)
        part.train_on_batch(x, y)  # trace
        part.predict_on_batch(x)
        train, _ = timed(lambda part=part, x=x, y=y: part.train_on_batch(x, y), repeats)
        forward, _ = timed(lambda part=part, x=x: part.predict_on_batch(x), repeats)
        out[variant] = {"cached": cached, "train": train["median"] / batch, "forward": forward["median"] / batch}
        print(f"[bench] {image_size}px {variant}: {out[variant]['train']:.3f} s/image training", flush=True)
    if any(v["cached"] for v in out.values()):
        keras.backend.clear_session()
        model = build_model(image_size=image_size, num_classes=10, trainable_layers=frozenset(), base_weights=None)
        prefix = split_model(model, "block5_pool").prefix
        x = tf.random.stateless_uniform((batch, image_size, image_size, 3), seed=(1, 2), maxval=255.0)
        prefix(x, training=False)
        extract, _ = timed(lambda: prefix(x, training=False).numpy(), repeats)
        out["_extraction"] = extract["median"] / batch
    return out


def study_cost(per_image: dict, study: dict) -> dict[str, dict]:
    """Hours per strategy for `study` from per-image seconds: tuning (trials x tune epochs) and
    training (seeds x epochs) passes over train + val, a test prediction per run, and, for the
    cached strategies, one feature extraction of every image."""
    n_train, n_val, n_test = (study[k] * study["classes"] for k in ("train_per_class", "val_per_class",
                                                                      "test_per_class"))  # fmt: skip
    runs = study["tune_trials"] + study["seeds"]
    epochs = study["tune_trials"] * study["tune_epochs"] + study["seeds"] * study["epochs"]
    out = {}
    for variant, cost in per_image.items():
        if variant.startswith("_"):
            continue
        epoch = n_train * cost["train"] + n_val * cost["forward"]
        extraction = (n_train + n_val + n_test) * per_image["_extraction"] if cost["cached"] else 0.0
        total = extraction + epochs * epoch + runs * n_test * cost["forward"]
        out[variant] = {"epoch_hours": epoch / 3600, "extraction_hours": extraction / 3600, "hours": total / 3600}
    return out


# ------------------------------------------------------------------ options that change numerics


def numerics_options(params: Params, weights_for, splits, data_sha: str, num_classes: int, epochs: int) -> list:
    """Seconds per epoch and validation accuracy of `fit_variant` with XLA or bfloat16 mixed
    precision against the default float32 run, for the end-to-end `full` strategy (where the
    options matter most) and the cached `partial` one; same seed, same data."""
    import dataclasses

    import keras

    from pipeline.training import fit_variant

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
            rows.append({"variant": variant, "option": label, "epoch": epoch, "val_accuracy": val,
                         "max_val_accuracy_change": change})  # fmt: skip
            print(f"[bench] {variant} {label}: {rows[-1]['epoch']['median']:.2f} s/epoch", flush=True)
    return rows


# ------------------------------------------------------------------ end to end


def end_to_end(noop_repeats: int, keep: Path | None) -> dict:
    """`dvc repro` from clean outputs in a temporary git copy of the repository (no feature
    cache, new MLflow store, no Optuna journals), then no-op reruns."""
    work = Path(tempfile.mkdtemp(prefix="vgg16-bench-"))
    repo = work / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if name.startswith(("results/", "reports/", "docs/")) or name == "dvc.lock":
            continue
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    git_env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
               "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}  # fmt: skip
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "bench copy"]):
        subprocess.run(["git", *args], cwd=repo, env=git_env, check=True, capture_output=True)
    usage = work / "usage.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env.update({"PIPELINE_USAGE_LOG": str(usage), "DVC_NO_ANALYTICS": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"})  # fmt: skip
    start = time.perf_counter()
    with subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:  # fmt: skip
        log = []
        for line in process.stdout:
            log.append(line)
            if line.startswith("Running stage"):
                print(f"[bench] {time.perf_counter() - start:6.0f}s {line.strip()}", flush=True)
        _, status, rusage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    clean_seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"dvc repro failed in {repo}:\n{''.join(log[-60:])}")
    noop, _ = timed(lambda: subprocess.run(["dvc", "repro"], cwd=repo, env=env, check=True, capture_output=True),
                    noop_repeats)  # fmt: skip
    stages = []
    for line in usage.read_text().splitlines():
        record = json.loads(line)
        if "--worker" not in record["argv"]:
            stages.append(record)
    tuning = {}
    for best_path in sorted((repo / "results" / "tune").glob("*/best_params.json")):
        best = json.loads(best_path.read_text())
        with open(best_path.parent / "trials.csv") as f:
            seconds = sum(float(row["seconds"]) for row in csv.DictReader(f))
        tuning[best["variant"]] = {**best["pruning"], "trial_seconds": seconds,
                                   "trials_per_minute": 60 * best["pruning"]["trials"] / seconds}  # fmt: skip
    result = {
        "tuning": tuning,
        "clean_seconds": clean_seconds, "noop_seconds": noop,
        "peak_rss_mb_all_stages": rusage.ru_maxrss / 1024, "stages": stages,
        "results": {str(p.relative_to(repo)): json.loads(p.read_text())
                    for p in sorted((repo / "results" / "train").glob("*/metrics.json"))},
    }  # fmt: skip
    if keep:
        shutil.rmtree(keep, ignore_errors=True)
        shutil.move(str(repo), keep)
    shutil.rmtree(work, ignore_errors=True)
    return result


# ------------------------------------------------------------------ report


def _fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def _stage_name(argv: list[str]) -> str:
    stage = argv[0]
    if "--variant" in argv:
        stage += f"@{argv[argv.index('--variant') + 1]}"
    return stage


def render(bench: dict | None, e2e: dict | None, numerics: dict | None = None, tune: dict | None = None) -> str:
    lines = ["# Benchmark", ""]
    if bench:
        m = bench["machine"]
        lines += [
            f"Measured {bench['date']} at commit `{bench['commit']}` on {m['cpus']} CPU cores ({m['processor']}), "
            f"TensorFlow {bench.get('tensorflow')}, by `make bench` ({bench['seconds'] / 60:.1f} min). Timed figures: "
            "median [min, max] over the repetitions counted in the table; ratios compare medians of one run.",
        ]
    if bench and "matmul" in bench:
        mm, fw = bench["matmul"], bench["forward"]
        lines += [
            "",
            "## Compute",
            "",
            f"- float32 matmul {mm['n']}x{mm['n']}: **{mm['gflops']:.1f} GFLOP/s** "
            f"(seconds {_fmt(mm['seconds'], 3)}, n={mm['seconds']['n']})",
            f"- VGG16 conv base forward at {fw['image_size']}x{fw['image_size']}: {fw['gflop_per_image']:.3f} GFLOP "
            "per image",
            "",
            f"| batch size | images | seconds | images/s | efficiency (vs matmul) | features identical to batch "
            f"{fw['batches'][0]['batch_size']} |",
            "|---:|---:|---|---:|---:|---|",
        ]
        for row in fw["batches"]:
            lines.append(
                f"| {row['batch_size']} | {row['images']} | {_fmt(row['seconds'])} (n={row['seconds']['n']}) "
                f"| {row['images_per_second']:.0f} | {row['efficiency']:.0%} | {row['identical_to_first']} |"
            )
    if bench and "strategies" in bench:
        lines += [
            "",
            "## Strategies: the pipeline vs a naive `model.fit`",
            "",
            "Naive: the whole Keras model with the strategy's layers frozen, `model.fit` on NumPy arrays, then "
            "predicting the test set (the way the tutorials do it). Pipeline: `training.fit_variant` (cached "
            "frozen prefix when the strategy has one; tf.data input). Epoch seconds: median [min, max] of epochs "
            f"2-{bench['strategies'][0]['epochs']} of one run. Run: build, fit "
            f"{bench['strategies'][0]['epochs']} epochs, predict test; cold = feature cache empty, warm = a second "
            "seed reusing the features. Budget: the strategy's whole default `dvc repro` budget "
            "(tune trials + seeds), estimated from the measured epoch, run and extraction times. FLOP bound: the "
            "largest epoch speed-up caching can give (FLOPs of a naive epoch / FLOPs of a pipeline epoch).",
            "",
            "| strategy | path | naive s/epoch | pipeline s/epoch | epoch speed-up | FLOP bound | naive run s "
            "| pipeline run s (cold / warm) | run speed-up (cold / warm) | budget speed-up |",
            "|---|---|---|---|---:|---:|---:|---|---|---:|",
        ]
        for row in bench["strategies"]:
            warm = f"{row['pipeline_run_warm']:.1f}" if row["pipeline_run_warm"] else "—"
            warm_x = f"{row['run_speedup_warm']:.1f}x" if row["run_speedup_warm"] else "—"
            lines.append(
                f"| {row['variant']} | {row['path']} | {_fmt(row['naive_epoch'])} | {_fmt(row['pipeline_epoch'])} "
                f"| **{row['epoch_speedup']:.1f}x** | {bench['flop_bound'][row['variant']]:.3g}x "
                f"| {row['naive_run']:.1f} | {row['pipeline_run_cold']:.1f} / {warm} "
                f"| {row['run_speedup_cold']:.1f}x / {warm_x} | {row['budget']['speedup']:.1f}x |"
            )
        scratch = next((r for r in bench["strategies"] if r["variant"] == "scratch"), None)
        if scratch:
            overhead = scratch["pipeline_epoch"]["median"] / scratch["naive_epoch"]["median"] - 1
            lines += ["", f"Pipeline overhead (scratch, the same model trained end to end both ways): "
                      f"{scratch['pipeline_epoch']['median']:.2f} s vs {scratch['naive_epoch']['median']:.2f} s "
                      f"per epoch, **{overhead:+.1%}** (goal: within 10%)."]  # fmt: skip
    if tune:
        t0 = tune["rows"][0]
        lines += [
            "",
            "## Tuning",
            "",
            f"Measured {tune['date']} at commit `{tune['commit']}` by `make bench-tune`: the tune stage's "
            f"objective, {t0['trials']} trials x {t0['epochs_per_trial']} epochs per strategy, in-memory Optuna "
            "storage, features extracted beforehand, the same random hyperparameters in both studies; unpruned = "
            "no pruner, pruned = a median pruner that may stop a trial after its first epoch once one trial has "
            "completed. One study each (n=1). The default `dvc repro`'s own tuning (6 trials x 3 epochs, the "
            "configured pruner) is in the end-to-end section.",
            "",
            "| strategy | trials/min pruned | epochs run | trials/min unpruned | epochs run | gain |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in tune["rows"]:
            p, u = row["pruned"], row["unpruned"]
            lines.append(f"| {row['variant']} | {p['trials_per_minute']:.1f} | {p['epochs_run']} | "
                             f"{u['trials_per_minute']:.1f} | {u['epochs_run']} | "
                             f"{p['trials_per_minute'] / u['trials_per_minute']:.2f}x |")  # fmt: skip
    if bench and bench.get("large_study"):
        ls = bench["large_study"]
        syn = ls["synthetic"]
        lines += [
            "",
            f"## A {ls['image_size']}x{ls['image_size']} study of {ls['images']:,} images",
            "",
            f"Feature cache on disk per strategy (float32, all splits; {ls['disk_free_gb']:.0f} GB free here):",
            "",
            "| strategy | cut after | feature shape | GB |",
            "|---|---|---|---:|",
        ]
        for variant, d in ls["disk"].items():
            lines.append(f"| {variant} | {d['cut']} | {tuple(d['shape'])} | {d['gb']:.1f} |" if d
                         else f"| {variant} | — (trains end to end) | — | 0 |")  # fmt: skip
        lines += [
            "",
            f"Synthetic run: frozen-strategy features of {syn['train_images']:,} images "
            f"({tuple(syn['shape'])}, {syn['file_gb']:.2f} GB) written to a memory-mapped file in "
            f"{syn['write_seconds']:.1f} s, then one epoch of head training "
            f"{'streamed from it' if syn['streamed'] else 'from an in-memory copy'} in {syn['epoch_seconds']:.1f} s. "
            f"Heap (anonymous) memory: {syn['rss_anon_before_mb']:.0f} MB before, peak {syn['rss_anon_peak_mb']:.0f} "
            f"MB during. File-backed resident pages (libraries, then the memory map through the page cache, "
            f"reclaimable): {syn['rss_file_before_mb']:.0f} MB before, peak {syn['rss_file_peak_mb']:.0f} MB. "
            f"Copying the features into memory would have added {syn['file_gb'] * 1e9 / 2**20:.0f} MB of heap.",
        ]
        if "study_cost" in ls:
            st = ls["study"]
            lines += [
                "",
                f"What a full study costs here: {st['classes']} classes x ({st['train_per_class']} train + "
                f"{st['val_per_class']} val + {st['test_per_class']} test) images at {ls['image_size']}x"
                f"{ls['image_size']}, {st['seeds']} seeds x {st['epochs']} epochs, tuning {st['tune_trials']} trials "
                f"x {st['tune_epochs']} epochs per strategy (no pruning), from seconds per image measured at "
                f"{ls['image_size']}x{ls['image_size']} (batches of 8, random weights; one training step or forward "
                "pass of what the strategy runs):",
                "",
                "| strategy | s/image training | s/image forward | one epoch, h | feature extraction, h "
                "| whole budget, h |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for variant, cost in ls["study_cost"].items():
                per = ls["per_image"][variant]
                lines.append(f"| {variant} | {per['train']:.3f} | {per['forward']:.3f} | {cost['epoch_hours']:.2f} "
                             f"| {cost['extraction_hours']:.2f} | {cost['hours']:.0f} |")  # fmt: skip
            total = sum(c["hours"] for c in ls["study_cost"].values())
            lines += ["", f"All strategies: about {total:.0f} hours ({total / 24:.1f} days) on this 2-core machine."]
    if e2e:
        lines += [
            "",
            "## End to end: `dvc repro`",
            "",
            f"Measured {e2e['date']} at commit `{e2e['commit']}` by `make bench-e2e`: a temporary git copy of the "
            "repository, clean outputs (no feature cache, no Optuna journals, new MLflow store).",
            "",
            f"- clean `dvc repro`: **{e2e['clean_seconds'] / 60:.1f} min** (n=1)",
            f"- no-op `dvc repro`: **{_fmt(e2e['noop_seconds'])} s** (n={e2e['noop_seconds']['n']})",
            f"- peak resident memory of any process: **{e2e['peak_rss_mb_all_stages'] / 1024:.2f} GB**",
            "",
            "| stage | seconds | peak RSS MB |",
            "|---|---:|---:|",
        ]
        for record in e2e["stages"]:
            peak = max(record["max_rss_mb"], record["max_rss_children_mb"])
            lines.append(f"| {_stage_name(record['argv'])} | {record['seconds']:.0f} | {peak:.0f} |")
        lines += [
            "",
            "Tuning inside that run (the default budget, with the configured pruner):",
            "",
            "| strategy | trials | pruned | epochs run | epochs saved | trials/min |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for variant, t in e2e["tuning"].items():
            saved = f"{t['epochs_saved']} ({t['epochs_saved_share']:.0%})"
            lines.append(f"| {variant} | {t['trials']} | {t['pruned_trials']} | {t['epochs_run']} | {saved} | "
                         f"{t['trials_per_minute']:.1f} |")  # fmt: skip
    if numerics:
        lines += [
            "",
            "## Options that change numerics (off by default)",
            "",
            f"Measured {numerics['date']} at commit `{numerics['commit']}` by `make bench-numerics`: `fit_variant` "
            "with `train.jit_compile: true` (XLA) or `train.mixed_precision: true` (bfloat16 compute) against "
            "the default float32, same seed and data, 3 epochs; seconds per epoch over epochs 2-3.",
            "",
            "| strategy | option | s/epoch | vs float32 | largest change in val accuracy |",
            "|---|---|---|---:|---:|",
        ]
        reference: dict[str, float] = {}
        for row in numerics["rows"]:
            base = reference.setdefault(row["variant"], row["epoch"]["median"])
            lines.append(f"| {row['variant']} | {row['option']} | {_fmt(row['epoch'])} | "
                         f"{row['epoch']['median'] / base:.2f}x | {row['max_val_accuracy_change']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run_sections(args) -> dict:
    """The in-process sections named in `args.sections`, in this process."""
    import tensorflow as tf

    from pipeline.data import load_split, load_summary
    from pipeline.training import Splits
    from pipeline.weights import load_base_weights

    params = load_params(args.params)
    sections = set(args.sections.split(","))
    summary = load_summary(args.prepared)
    splits = Splits(*(load_split(args.prepared, s) for s in ("train", "val", "test")))
    num_classes = len(summary["class_names"])
    weights = {v: load_base_weights(params.variant_weights(v)) for v in params.variants}
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="vgg16-bench-cache-"))
    out: dict = {"tensorflow": tf.__version__}
    if "compute" in sections:
        out["matmul"] = matmul_flops(2048, args.repeats)
        print(f"[bench] matmul {out['matmul']['gflops']:.1f} GFLOP/s", flush=True)
        pretrained = next(w for w in weights.values() if w.arrays is not None)
        out["forward"] = forward_throughput(params, pretrained, splits.train[0], out["matmul"], args.repeats)
    if "strategies" in sections:
        out["flop_bound"] = flop_bound(params, num_classes, splits)
        out["strategies"] = strategy_timings(
            params, weights.__getitem__, splits, summary["data_sha256"], num_classes, cache
        )
    if "large" in sections:
        with tempfile.TemporaryDirectory(prefix="vgg16-bench-large-", dir=cache.parent) as work:
            out["large_study"] = large_study(params, args.large_images, args.large_size, Path(work),
                                             args.synthetic_images)  # fmt: skip
    return out


def _commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the short measurements")
    parser.add_argument("--sections", default="compute,strategies,large",
                        help="comma-separated subset of compute,strategies,large (default: all)")  # fmt: skip
    parser.add_argument("--tune-trials", type=int, default=3)
    parser.add_argument("--tune-epochs", type=int, default=2)
    parser.add_argument("--large-images", type=int, default=10_000, help="size of the estimated large study")
    parser.add_argument("--large-size", type=int, default=224)
    parser.add_argument("--synthetic-images", type=int, default=10_000)
    parser.add_argument("--end-to-end", action="store_true", help="only the end-to-end section (about 20 min)")
    parser.add_argument("--numerics", action="store_true", help="only the XLA / mixed-precision section (~5 min)")
    parser.add_argument("--tune", action="store_true", help="only tune trials/min with and without pruning (~7 min)")
    parser.add_argument("--keep", type=Path, help="with --end-to-end: move the finished copy here")
    parser.add_argument("--section-out", type=Path, help=argparse.SUPPRESS)  # internal: one section's JSON
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)  # internal: shared feature cache
    args = parser.parse_args(argv)
    ensure_writable(args.out, "--out")
    machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    header = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": _commit()}

    if args.end_to_end:
        result = {**header, **end_to_end(max(3, args.repeats), args.keep)}
        write_json(args.out / "benchmark_e2e.json", result)
    elif args.numerics:
        from pipeline.data import load_split, load_summary
        from pipeline.training import Splits
        from pipeline.weights import load_base_weights

        params = load_params(args.params)
        summary = load_summary(args.prepared)
        splits = Splits(*(load_split(args.prepared, s) for s in ("train", "val", "test")))
        rows = numerics_options(
            params, lambda v: load_base_weights(params.variant_weights(v)), splits, summary["data_sha256"],
            len(summary["class_names"]), epochs=3,
        )  # fmt: skip
        write_json(args.out / "benchmark_numerics.json", {**header, "rows": rows})
    elif args.tune:
        params = load_params(args.params)
        with tempfile.TemporaryDirectory(prefix="vgg16-bench-") as cache:
            rows = tune_rates(params, args.prepared, Path(cache), args.tune_trials, args.tune_epochs)
        write_json(args.out / "benchmark_tune.json", {**header, "rows": rows})
    elif args.section_out:
        write_json(args.section_out, run_sections(args))
        return
    else:
        # each section in its own process: Keras does not free trained models (keras-team/keras#17458),
        # so one process would carry every earlier section's memory into the next one's figures
        start = time.perf_counter()
        bench: dict = {**header, "machine": machine}
        with tempfile.TemporaryDirectory(prefix="vgg16-bench-") as scratch:
            for section in args.sections.split(","):
                part = Path(scratch) / f"{section}.json"
                command = [sys.executable, "-m", "pipeline.bench", *(argv or sys.argv[1:]), "--sections", section,
                           "--section-out", str(part), "--cache-dir", str(Path(scratch) / "cache")]  # fmt: skip
                subprocess.run(command, check=True)
                bench.update(json.loads(part.read_text()))
        bench["seconds"] = time.perf_counter() - start
        write_json(args.out / "benchmark.json", bench)
    parts = [args.out / f"benchmark{suffix}.json" for suffix in ("", "_e2e", "_numerics", "_tune")]
    document = render(*(json.loads(path.read_text()) if path.is_file() else None for path in parts))
    write_text(args.out / "benchmark.md", document)
    print(f"[bench] wrote {args.out / 'benchmark.md'}")


if __name__ == "__main__":
    run_stage(main)
