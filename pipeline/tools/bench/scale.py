"""Benchmark of scale: the feature caches of a large study on disk and streamed from memory maps,
per-image seconds at a large image size and the cost of a full study, and the end-to-end
`dvc repro` in a temporary copy of the repository with wall time and peak memory per stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.core.params import Params
from pipeline.tools.bench.measure import MemorySampler, timed

REPO = Path(__file__).resolve().parents[3]  # pipeline/tools/bench/ -> the repository

# ------------------------------------------------------------------ streaming a large study


def _study_model(params, image_size: int, trainable: frozenset[str]):
    """The default head on a randomly initialised base at `image_size`, 10 classes (what a study's
    strategies train; no feature normalisation, so the model's shape is known without data)."""
    from pipeline.core.model import ModelSpec, build_model

    return build_model(
        ModelSpec(
            image_size=image_size,
            num_classes=10,
            trainable_layers=trainable,
            pooling=params.model.pooling,
            head_units=params.model.head_units,
            dropout=params.model.dropout,
            augmentation=False,
            head_norm="none",
        ),
        None,
    )


def large_study(params: Params, images_total: int, image_size: int, work: Path, train_images: int) -> dict:
    """Disk needed by the feature caches of a `image_size` study of `images_total` images, and a
    synthetic run (`synthetic_stream`): the frozen strategy's cached features of that study written
    to a memory-mapped file, then one epoch of head training streamed from it."""
    from pipeline.core.frozen_features import cut_layer, split_model
    from pipeline.core.model import ModelSpec, build_model

    model = build_model(ModelSpec(image_size=image_size, num_classes=10, trainable_layers=frozenset()), None)
    disk = {}
    for variant in params.variants:
        cut = cut_layer(model, params.variant(variant).layers)
        if cut is None or params.variant_weights(variant) == "none":
            disk[variant] = None
            continue
        shape = split_model(model, cut).prefix.output.shape[1:]
        disk[variant] = {"cut": cut, "shape": list(shape), "gb": images_total * int(np.prod(shape)) * 4 / 1e9}
    free_gb = shutil.disk_usage(work).free / 1e9
    shape = tuple(split_model(model, "block5_pool").prefix.output.shape[1:])
    per_image = per_image_seconds(params, image_size)
    return {
        "per_image": per_image,
        "study": FULL_STUDY,
        "study_cost": study_cost(per_image, FULL_STUDY),
        "images": images_total,
        "image_size": image_size,
        "disk": disk,
        "disk_free_gb": free_gb,
        "synthetic": synthetic_stream(params, image_size, shape, work / "synthetic_features.npy", train_images),
    }


def synthetic_stream(params: Params, image_size: int, shape: tuple, path: Path, train_images: int) -> dict:
    """`train_images` synthetic block5 features of `shape` written to the memory-mapped file `path`,
    then one epoch of the frozen strategy's head streamed from it, peak memory sampled; the file
    is removed. One measured sequence: the write, then the stream while sampling memory."""
    from pipeline.core.fit import STREAM_BYTES, batches, seed_everything
    from pipeline.core.frozen_features import split_model
    from pipeline.core.model import compile_model

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
    full = _study_model(params, image_size, frozenset())
    head = split_model(full, "block5_pool").suffix  # what the frozen strategy trains on cached features
    compile_model(head, params.train.learning_rate, frozenset())
    dataset = batches(features, labels, params.train.batch_size, 0, shuffle=True)
    with MemorySampler() as memory:
        start = time.perf_counter()
        head.fit(dataset, epochs=1, verbose=0)
        epoch_seconds = time.perf_counter() - start
    path.unlink()
    return {
        "train_images": train_images,
        "shape": list(shape),
        "file_gb": train_images * int(np.prod(shape)) * 4 / 1e9,
        "write_seconds": write_seconds,
        "epoch_seconds": epoch_seconds,
        "streamed": train_images * int(np.prod(shape)) * 4 > STREAM_BYTES,
        "rss_anon_before_mb": memory.before["RssAnon"],
        "rss_anon_peak_mb": memory.peak["RssAnon"],
        "rss_file_before_mb": memory.before["RssFile"],
        "rss_file_peak_mb": memory.peak["RssFile"],
    }


# A study worth running on a GPU, costed on this machine from measured per-image seconds
FULL_STUDY = {
    "train_per_class": 700,
    "val_per_class": 150,
    "test_per_class": 150,
    "classes": 10,
    "epochs": 20,
    "seeds": 5,
    "tune_trials": 20,
    "tune_epochs": 5,
}


def per_image_seconds(params: Params, image_size: int, batch: int = 8, repeats: int = 2) -> dict:
    """Measured seconds per image at `image_size`: a training step and a forward pass of the part
    of the model each strategy runs (the whole model end to end, or the suffix after the cut on
    features of the right shape), batches of `batch`, median of `repeats` after a warm-up."""
    import keras
    import tensorflow as tf

    from pipeline.core.frozen_features import cut_layer, split_model
    from pipeline.core.model import ModelSpec, build_model, compile_model

    out = {}
    for variant in params.variants:
        trainable = params.variant(variant).layers
        keras.backend.clear_session()
        model = _study_model(params, image_size, trainable)
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
        model = build_model(ModelSpec(image_size=image_size, num_classes=10, trainable_layers=frozenset()), None)
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
    n_train, n_val, n_test = (
        study[k] * study["classes"] for k in ("train_per_class", "val_per_class", "test_per_class")
    )
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


# ------------------------------------------------------------------ end to end


def copy_repository(repo: Path) -> Path:
    """A git repository at `repo` holding this one's tracked files, outputs left out (results,
    reports, figures, dvc.lock; the READMEs that explain output folders stay): a fresh clone's
    state before its first `dvc repro`."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        output = name.startswith(("results/", "reports/", "docs/")) and not name.endswith("README.md")
        if output or name == "dvc.lock":
            continue
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    names = {"GIT_AUTHOR_NAME": "bench", "GIT_COMMITTER_NAME": "bench"}
    git_env = {**os.environ, **names, "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run(["git", *args], cwd=repo, env=git_env, check=True, capture_output=True)
    return repo


def _repro(repo: Path, env: dict, log_path: Path) -> tuple[float, float]:
    """(seconds, peak resident MB of any process) of one `dvc repro`, its output kept in `log_path`."""
    start = time.perf_counter()
    with subprocess.Popen(
        ["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        log = []
        for line in process.stdout:
            log.append(line)
            if line.startswith("Running stage"):
                print(f"[bench] {time.perf_counter() - start:6.0f}s {line.strip()}", flush=True)
        _, status, rusage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    log_path.write_text("".join(log))  # the terminal output a user sees, kept with --keep
    if process.returncode != 0:
        raise RuntimeError(f"dvc repro failed in {repo}:\n{''.join(log[-60:])}")
    return seconds, rusage.ru_maxrss / 1024


def _tuning_rates(repo: Path) -> dict:
    """Per strategy: trials, epochs and seconds the run's tuning took, and the learning rate it chose."""
    from pipeline.core.results import read_tuning

    tuning = {}
    for variant in sorted(p.parent.name for p in (repo / "results" / "tune").glob("*/best_params.json")):
        record = read_tuning(repo / "results" / "tune", variant)
        best, budget = record["best"], record["best"]["budget"]
        seconds = sum(float(row["seconds"]) for row in record["trials"])
        tuning[best["variant"]] = {
            "trials": budget["trials_run"],
            "pruned_trials": budget["pruned_trials"],
            "epochs_run": budget["epochs_run"],
            "trial_seconds": seconds,
            "trials_per_minute": 60 * budget["trials_run"] / seconds,
            "learning_rate": best["learning_rate"],
            "learning_rate_at_edge": best["learning_rate_at_edge"],
        }
    return tuning


def end_to_end(noop_repeats: int, keep: Path | None) -> dict:
    """`dvc repro` from clean outputs in a temporary git copy of the repository (no feature
    cache, new MLflow store, no Optuna journals), then no-op reruns."""
    work = Path(tempfile.mkdtemp(prefix="vgg16-bench-"))
    repo = copy_repository(work / "repo")
    usage = work / "usage.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env.update(
        {
            "PIPELINE_USAGE_LOG": str(usage),
            "DVC_NO_ANALYTICS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        }
    )
    clean_seconds, peak_mb = _repro(repo, env, work / "dvc_repro.log")
    noop, _ = timed(
        lambda: subprocess.run(["dvc", "repro"], cwd=repo, env=env, check=True, capture_output=True), noop_repeats
    )
    records = [json.loads(line) for line in usage.read_text().splitlines()]
    result = {
        "tuning": _tuning_rates(repo),
        "clean_seconds": clean_seconds,
        "noop_seconds": noop,
        "peak_rss_mb_all_stages": peak_mb,
        "stages": [record for record in records if "--worker" not in record["argv"]],
        "results": {
            str(p.relative_to(repo)): json.loads(p.read_text())
            for p in sorted((repo / "results" / "train").glob("*/metrics.json"))
        },
    }
    if keep:
        shutil.rmtree(keep, ignore_errors=True)
        shutil.move(str(repo), keep)
        shutil.move(str(work / "dvc_repro.log"), keep / "dvc_repro.log")
    shutil.rmtree(work, ignore_errors=True)
    return result
