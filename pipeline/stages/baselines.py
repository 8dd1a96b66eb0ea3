"""Stage `baselines`: the reference points every strategy is read against, from scikit-learn on
the same prepared splits (about a minute on 2 cores, no network is trained).

  pixels_logistic_regression  multinomial logistic regression on the pixels scaled to 0..1
  frozen_linear_probe         the same on the frozen strategy's own features: the conv base's
                              pooled output (`model.weights`, `model.pooling`), i.e. exactly what
                              the `frozen` head sees; a convex problem solved to optimality

The L2 strength C is chosen on validation log-loss; the test split is predicted once. L-BFGS
solves to `TOL`, and the main comparison refits the chosen C on reordered training rows to
measure how far the test predictions can move with floating-point summation order (what another
machine or BLAS changes); the report states it. Reads
params.yaml (`data`, `model`, `variants`, `train.cache_features`, `mlflow`) and the prepared data.
Writes `--out` (results/baselines/):
  metrics.json                per baseline: test accuracy, macro-F1, validation accuracy, chosen settings
  predictions/<baseline>.csv  per test image: label, predicted class (for paired comparisons)
  probes_by_cut.json          per cut point of a head-only strategy below block5 (`variants.*.cut_after`):
                              the same probe on that cut's head input, the report's check of the head
                              (not a candidate of the answer: the strategy at that cut is)
and one MLflow run per baseline (`baseline/<name>`, tag `baseline: true`) and per probe of a cut
(`baseline/frozen_linear_probe@<cut>`, tag `check_of_cut`).

With `--train-per-class N` (stage `sample_efficiency_baselines@N`), both baselines are fitted for
every seed of the sample-efficiency study on the very training subset `train --train-per-class N`
gives that seed (the study's pool, `splits.sample_efficiency_pool`), so the study's strategies are
read against references trained on the same images. Writes `--out`
(results/studies/sample_efficiency/baselines/n<N>/):
  metrics.json                        per baseline: mean test accuracy and the record of every seed
  predictions/<baseline>/<seed>.csv   per test image: label, predicted class
and MLflow runs `sample_efficiency/baseline/<name>/n<N>/seed-<seed>` (tags `baseline`, `study`).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from pipeline.core import results
from pipeline.core.data import load_split, load_summary
from pipeline.core.evaluation import evaluate
from pipeline.core.params import Params, load_params
from pipeline.core.results import PIXELS, PROBE
from pipeline.core.splits import sample_efficiency_pool, study_subset
from pipeline.core.vgg16 import CUT_POINTS, FULL_BASE, feature_map, head_pool_size
from pipeline.runtime.atomic import atomic_dir, ensure_writable, write_json
from pipeline.runtime.cli import run_stage
from pipeline.runtime.errors import ConfigError
from pipeline.stack import metric_names, tracking

PROBES_FILE = "probes_by_cut.json"  # checks, not candidates: the probe on a cut base's features
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
MAX_ITER = 5000
# Measured on the default data (3 row orders, every C of the grid): at scikit-learn's default 1e-4
# the pixel baseline's test predictions moved by up to 5 of 2000 images at its chosen C=0.1, at
# 1e-6 by 1, and 1e-8 / 1e-10 moved them no less (L-BFGS then stops on the loss's relative
# change, not on the gradient); 1e-6 costs about 1.2x the iterations of 1e-4.
TOL = 1e-6
REORDERINGS = 2  # refits of the chosen C on permuted training rows (main comparison only)
REORDER_SEED = 0  # fixed, not `seed`: the measurement is not a draw of the experiment


def _solve(c: float, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=MAX_ITER, tol=TOL).fit(x, y)


def fit_logistic_regression(
    train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray]
) -> tuple[object, dict]:
    """L2 logistic regression (L-BFGS, multinomial) with C chosen on validation log-loss, the
    criterion the strategies' training rule uses too (accuracy on a few hundred validation
    images is coarse: it ties, and picked C=100 where the loss picks 0.1 on the default data).
    Returns (predict-probabilities function, record)."""
    best, iterations = None, {}
    for c in C_GRID:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model = _solve(c, *train)
        iterations[f"{c:g}"] = int(model.n_iter_[0])  # the FLOP account (pipeline/analysis/cost.py)
        loss = float(log_loss(val[1], model.predict_proba(val[0]), labels=model.classes_))
        if best is None or loss < best[0]:
            converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
            record = {"C": c, "converged": converged, "val_loss": loss, "val_accuracy": float(model.score(*val))}
            best = (loss, model, record)
    _, model, record = best
    return model.predict_proba, {**record, "C_grid": list(C_GRID), "tol": TOL, "iterations": iterations}


def reorder_stability(train: tuple[np.ndarray, np.ndarray], c: float, test: np.ndarray) -> dict:
    """How many test predictions change when the same problem is solved on the training rows in
    another order: the optimum is unique, the path L-BFGS takes to its tolerance is not, and row
    order stands in for what another machine's summation order does. Returns the largest count
    over `REORDERINGS` permutations, and that count over the test images: the most the test
    accuracy can move (it moves by less when changes cancel)."""
    reference = _solve(c, *train).predict(test)
    rng = np.random.default_rng(REORDER_SEED)
    changed = []
    for _ in range(REORDERINGS):
        order = rng.permutation(len(train[1]))
        changed.append(int(np.sum(_solve(c, train[0][order], train[1][order]).predict(test) != reference)))
    return {
        "reorderings": REORDERINGS,
        "max_changed_predictions": max(changed),
        "max_accuracy_change": max(changed) / len(test),
    }


def pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def frozen_features(
    params: Params, splits: dict, data_sha256: str, cache_dir: str | None, cut: str = FULL_BASE
) -> dict[str, np.ndarray]:
    """A head-only strategy's head input for each split: the conv base's output after block `cut`,
    pooled as the head pools it (`model.pooling`: flattened, average-pooled first where `auto` says
    so, or global average)."""
    size = params.data.image_size
    window = head_pool_size(*feature_map(size, cut), params.model.pooling)
    out = {}
    for name, maps in cut_maps(params, splits, data_sha256, cache_dir, cut).items():
        out[name] = maps.mean(axis=(1, 2)) if params.model.pooling == "gap" else average_pool(maps, window)
    return out


def cut_maps(
    params: Params, splits: dict, data_sha256: str, cache_dir: str | None, cut: str = FULL_BASE
) -> dict[str, np.ndarray]:
    """{split: N x H x W x C} output of `<cut>_pool` of the conv base on `model.weights`, from the
    shared feature cache when enabled (the same entries the cached strategies read)."""
    from pipeline.core import frozen_features
    from pipeline.core.model import ModelSpec, build_model
    from pipeline.core.weights import load_base_weights

    weights = load_base_weights(params.model.weights)
    size = params.data.image_size
    model = build_model(
        ModelSpec(image_size=size, num_classes=2, trainable_layers=frozenset(), cut_after=cut), weights.arrays
    )
    layer = f"{cut}_pool"
    prefix = frozen_features.split_model(model, layer).prefix
    batch = frozen_features.extraction_batch_size(size)
    cache = frozen_features.FeatureCache(cache_dir) if cache_dir and weights.sha256 else None
    key = frozen_features.cache_key(data_sha256, weights.sha256, layer, size) if cache else None
    out = {}
    for name, (images, _) in splits.items():
        if cache:
            out[name] = np.asarray(cache.get_or_compute(key, name, prefix, images, batch)[0])
        else:
            out[name] = frozen_features.predict(prefix, images, batch)
    return out


def average_pool(maps: np.ndarray, window: int) -> np.ndarray:
    """N x H x W x C feature maps -> N x (grid x grid x C), flattened row-major as Keras's Flatten:
    the mean over window x window cells with stride `window` and "same" padding, as Keras's
    AveragePooling2D computes it (grid = ceil(side / window), the padding split with the smaller
    half before, padded positions left out of the mean); window 1 is a plain flatten."""
    if window == 1:
        return maps.reshape(len(maps), -1)
    n, height, width, channels = maps.shape
    grid_h, grid_w = -(-height // window), -(-width // window)
    before_h = max((grid_h - 1) * window + window - height, 0) // 2
    before_w = max((grid_w - 1) * window + window - width, 0) // 2
    pooled = np.empty((n, grid_h, grid_w, channels), dtype=np.float64)
    for i in range(grid_h):
        top = i * window - before_h
        for j in range(grid_w):
            left = j * window - before_w
            cell = maps[:, max(top, 0) : top + window, max(left, 0) : left + window]
            pooled[:, i, j] = cell.mean(axis=(1, 2), dtype=np.float64)
    return pooled.astype(np.float32).reshape(n, -1)


def standardize(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Centred on the training mean and scaled by one global standard deviation, as the head's
    `model.head_norm: standardize` does: the same linear function class, but L-BFGS converges in a
    fraction of the iterations it needs on raw 0..160 activations."""
    mean, scale = x["train"].mean(axis=0), np.sqrt(x["train"].var(axis=0).mean()) or 1.0
    return {name: (values - mean) / scale for name, values in x.items()}


def inputs(params: Params, splits: dict, data_sha256: str, cache_dir: str | None) -> dict[str, dict[str, np.ndarray]]:
    """{baseline: {split: design matrix}} for every baseline the params allow (no probe without
    pretrained weights), before any normalisation."""
    out = {PIXELS: {name: pixels(images) for name, (images, _) in splits.items()}}
    if params.model.weights != "none":
        out[PROBE] = frozen_features(params, splits, data_sha256, cache_dir)
    return out


def fit(
    params: Params,
    x: dict[str, dict[str, np.ndarray]],
    splits: dict,
    class_names: list[str],
    train_rows: np.ndarray | None = None,
    stability: bool = False,
) -> tuple[dict, dict]:
    """({baseline: record}, {baseline: test probabilities}) from `inputs(...)`, trained on
    `train_rows` of the training split (all of it when None); the probe is standardised with the
    statistics of the rows it trains on, as the head is. `stability` adds each baseline's
    `reorder_stability` at its chosen C (two more solves each)."""
    rows = slice(None) if train_rows is None else train_rows
    labels = {name: y for name, (_, y) in splits.items()}
    train_labels = labels["train"][rows]
    descriptions = {
        PIXELS: "pixels / 255",
        PROBE: f"{params.model.weights} conv base, block5_pool, {params.model.pooling}",
    }
    records, probabilities = {}, {}
    for name, values in x.items():
        values = {**values, "train": values["train"][rows]}
        if name == PROBE:
            values = standardize(values)
        predict, record = fit_logistic_regression((values["train"], train_labels), (values["val"], labels["val"]))
        probabilities[name] = predict(values["test"])
        evaluation = evaluate(labels["test"], probabilities[name], class_names)
        records[name] = {
            "test_accuracy": evaluation["test_accuracy"],
            "test_macro_f1": evaluation["test_macro_f1"],
            **record,
            "features": descriptions[name],
            "conv_base_features": name == PROBE,  # its cost includes the conv base's forward pass
            "dimensions": int(values["train"].shape[1]),
            "train_images": len(train_labels),
            "test_images": len(labels["test"]),
        }
        if stability:
            train = (values["train"], train_labels)
            records[name]["stability"] = reorder_stability(train, record["C"], values["test"])
    return records, probabilities


def compute(params: Params, prepared: Path, cache_dir: str | None) -> tuple[dict, dict]:
    """({baseline: record}, {baseline: test probabilities}) for both baselines on the prepared data."""
    splits = {name: load_split(prepared, name) for name in ("train", "val", "test")}
    summary = load_summary(prepared)
    x = inputs(params, splits, summary["data_sha256"], cache_dir)
    return fit(params, x, splits, summary["class_names"], stability=True)


def _log(name: str, record: dict, run_name: str, tags: dict) -> None:
    settings = {k: record[k] for k in ("C", "features", "dimensions", "train_images")}
    with tracking.run(run_name, tags={**tags, "variant": name}, params=settings):
        tracking.log_metrics(metric_names.baseline(record))
    print(
        f"[{run_name}] test accuracy {record['test_accuracy']:.4f} (validation {record['val_accuracy']:.4f}, "
        f"C={record['C']:g})",
        flush=True,
    )


def probe_cuts(params: Params) -> list[str]:
    """The cut points below the whole base where a head-only strategy on `model.weights` stands:
    each gets a convex probe on the very features its head sees (the report's check that the head
    is trained to what its features allow)."""
    cuts = {
        variant.cut_after
        for name, variant in params.variants.items()
        if not variant.layers and params.variant_weights(name) == params.model.weights
    }
    return sorted(cuts - {FULL_BASE}, key=list(CUT_POINTS).index) if params.model.weights != "none" else []


def cut_probes(params: Params, prepared: Path, cache_dir: str | None) -> dict[str, dict]:
    """{cut: the probe's record} for `probe_cuts`: logistic regression with C chosen on validation
    on the standardised head input of a base cut there."""
    cuts = probe_cuts(params)
    if not cuts:
        return {}
    splits = {name: load_split(prepared, name) for name in ("train", "val", "test")}
    summary = load_summary(prepared)
    labels = {name: y for name, (_, y) in splits.items()}
    out = {}
    for cut in cuts:
        values = standardize(frozen_features(params, splits, summary["data_sha256"], cache_dir, cut))
        predict, record = fit_logistic_regression((values["train"], labels["train"]), (values["val"], labels["val"]))
        evaluation = evaluate(labels["test"], predict(values["test"]), summary["class_names"])
        out[cut] = {
            "test_accuracy": evaluation["test_accuracy"],
            **record,
            "features": f"{params.model.weights} conv base cut after {cut}, {params.model.pooling}",
            "dimensions": int(values["train"].shape[1]),
            "train_images": len(labels["train"]),
        }
    return out


def main_comparison(params: Params, prepared: Path, out: Path, cache_dir: str | None, tags: dict) -> None:
    labels = load_split(prepared, "test")[1]
    records, probabilities = compute(params, prepared, cache_dir)
    probes = cut_probes(params, prepared, cache_dir)
    with atomic_dir(out) as tmp:
        for name, record in records.items():
            _log(name, record, f"baseline/{name}", tags)
        for cut, record in probes.items():  # beside the probe on the whole base, for the MLflow comparison view
            _log(f"{PROBE}@{cut}", record, f"baseline/{PROBE}@{cut}", {**tags, "check_of_cut": cut})
        results.write_baselines(tmp, records, labels, probabilities)
        write_json(tmp / PROBES_FILE, probes)


def sample_efficiency(params: Params, per_class: int, out: Path, cache_dir: str | None, tags: dict) -> None:
    """Both baselines at `per_class` training images per class for every seed of the study, each
    on exactly the subset `train --train-per-class` gives that seed (the same pool, the same draw)."""
    pool = sample_efficiency_pool(params, per_class)
    x = inputs(params, pool.splits, pool.summary["data_sha256"], cache_dir)
    labels = pool.splits["test"][1]
    per_seed: dict[str, dict[int, dict]] = {}
    with atomic_dir(out) as tmp:
        for seed in params.studies.sample_efficiency.seeds:
            rows = study_subset(params, pool.splits["train"][1], per_class, seed)
            records, probabilities = fit(params, x, pool.splits, pool.class_names, rows)
            for name, record in records.items():
                results.write_seed_predictions(tmp, name, seed, labels, probabilities[name])
                per_seed.setdefault(name, {})[seed] = record
                study_tags = {**tags, "study": "sample_efficiency"}
                _log(name, record, f"sample_efficiency/baseline/{name}/n{per_class}/seed-{seed}", study_tags)
        results.write_sample_baselines(tmp, per_class, per_seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", required=True)
    parser.add_argument("--prepared", type=Path, help="the prepare stage's output folder (not with --train-per-class)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-per-class", type=int, help="sample-efficiency study: N images per class, every seed")
    parser.add_argument("--feature-cache", required=True)
    args = parser.parse_args(argv)
    if args.train_per_class is not None and args.train_per_class < 1:
        raise ConfigError("--train-per-class", f"{args.train_per_class} is not allowed; it must be at least 1")
    if args.train_per_class is None and args.prepared is None:
        raise ConfigError("--prepared", "is required: the prepare stage's output folder (data/prepared)")
    params = load_params(args.params)
    ensure_writable(args.out, "--out")
    cache_dir = args.feature_cache if params.train.cache_features else None
    if cache_dir:
        ensure_writable(cache_dir, "--feature-cache")
    tracking.open_store(params.mlflow, args.params)
    tags = {"stage": "baseline", "baseline": "true", **tracking.environment_tags()}
    if args.train_per_class is None:
        main_comparison(params, args.prepared, args.out, cache_dir, tags)
    else:
        sample_efficiency(params, args.train_per_class, args.out, cache_dir, tags)


if __name__ == "__main__":
    run_stage(main)
