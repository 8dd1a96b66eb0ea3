"""Stage `predict`: guess the answer before training, from one forward pass of the pretrained base.

The pipeline answers "which layers should train?" by training every strategy. This stage scores
the pretrained features instead, in seconds, so that the report can put each cheap predictor's
ranking beside the measured one (README "Predicting the answer"). Per feature source (the pixels;
each block's output as a head on a base cut there reads it, `model.pooling`, flattened at 32x32;
and each block's output averaged over its map, `<block>_gap`, where that is another view), on the
training split: a ridge probe's validation accuracy and the four scores of
`pipeline.analysis.transferability` (LogME, H-score, TransRate, GBC). Per conv layer: the
relative gradient norm |dL/dW| / |W| of a fresh head's loss at the pretrained weights, averaged
over `RGN_BATCHES` training batches (Auto-RGN, Lee et al. 2023: blocks whose weights the loss
pulls hardest are the ones to train).

How a score becomes a strategy's prediction (`strategy_sources`): a strategy starts from the
features of its cut block, and whatever trains can move them; so it is predicted to reach the best
score among the features it starts from (its cut block) and the highest features it keeps fixed
(the block below its first trained layer, the pixels when block1 trains, and the pixels alone on
random weights). A head-only strategy gets its cut block's score. The gradient norms rank no
strategy (they say where training would act, not how far it gets); the report shows the block they
point at.

Reads params.yaml (`seed`, `data.image_size`, `model.weights`, `model.pooling`, `variants`,
`studies.depth`, `mlflow`; with the sample-efficiency study on, `studies.sample_efficiency` and the
`data` keys its pool is prepared from) and the prepared train and validation splits. Writes `--out`
(results/predict/):
  scores.json   per source: dimensions and every score; per conv layer: relative gradient norm;
                per predictor: each strategy's (and depth cell's) predicted score and the ranking;
                per sample-efficiency size: the same scores on that size's training subsets
                (mean over the study's seeds) and each strategy's predicted score; seconds spent
and an MLflow run `predict` (tag `stage: predict`) with every score as a metric
(`<source>/<predictor>`, `rgn/<conv layer>`, `n<size>/<source>/<predictor>`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipeline.analysis import transferability
from pipeline.core.data import load_split, load_summary
from pipeline.core.params import Params, load_params
from pipeline.core.splits import sample_efficiency_pool, study_subset
from pipeline.core.vgg16 import BLOCKS, CONV_LAYERS, CUT_POINTS, feature_map, head_pool_size, kept_layers
from pipeline.runtime.atomic import atomic_dir, ensure_writable, write_json
from pipeline.runtime.cli import run_stage
from pipeline.stack import metric_names, tracking

SCORES_FILE = "scores.json"
PIXELS = "pixels"
GAP = "_gap"  # suffix of a block's globally averaged output, where the head reads another view
PROBE_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)  # ridge strength, chosen on validation
RGN_BATCHES = 4
RGN_BATCH_SIZE = 32
MAX_IMAGES = 2000  # per split: the scores work in the n x n Gram space; the default data has 500
SCORERS = {
    "logme": transferability.logme,
    "h_score": transferability.h_score,
    "transrate": transferability.transrate,
    "gbc": transferability.gbc,
}
PREDICTORS = ("ridge_probe", *SCORERS)


def score_source(
    train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], predictors: tuple[str, ...] = PREDICTORS
) -> dict:
    """{predictor: value, "dimensions": d, "seconds": {predictor: s}} of one feature source."""
    out, seconds = {"dimensions": int(train[0].shape[1])}, {}
    for name in predictors:
        start = time.perf_counter()
        if name == "ridge_probe":
            out[name] = transferability.ridge_probe(train, val, PROBE_ALPHAS)
        else:
            out[name] = SCORERS[name](*train)
        seconds[name] = round(time.perf_counter() - start, 3)
    return {**out, "seconds": seconds}


def strategy_sources(trainable: frozenset[str], cut: str, weights: str) -> list[str]:
    """The feature sources a strategy is predicted from (module docstring): its cut block, and the
    highest fixed features below its first trained layer; the pixels alone on random weights."""
    if weights == "none":
        return [PIXELS]
    if not trainable:
        return [cut]
    first = min(CONV_LAYERS.index(layer) for layer in trainable)
    fixed = [block for block in CUT_POINTS if CONV_LAYERS.index(BLOCKS[block][-1]) < first]  # whole blocks below
    return sorted({fixed[-1] if fixed else PIXELS, cut}, key=[PIXELS, *CUT_POINTS].index)


def candidates(params: Params) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({strategy or depth cell: its sources}, {one that cannot be predicted: why}): the
    strategies of params.yaml, then the depth study's cells. The stage scores `model.weights`'
    features; a strategy on other pretrained weights is left out, saying so."""
    cells = {
        name: (variant.layers, variant.cut_after, params.variant_weights(name))
        for name, variant in params.variants.items()
    }
    depth = params.studies.depth
    for cut in depth.cut_after:
        kept = kept_layers(cut)
        for k in (k for k in depth.k if k <= len(kept)):
            cells[depth.variant_name(cut, k)] = (
                frozenset(kept[len(kept) - k :]),
                cut,
                depth.weights or params.model.weights,
            )
    out, skipped = {}, {}
    for name, (trainable, cut, weights) in cells.items():
        if weights in ("none", params.model.weights):
            out[name] = strategy_sources(trainable, cut, weights)
        else:
            skipped[name] = (
                f"its weights ({weights}) are not model.weights ({params.model.weights}), whose features are scored"
            )
    return out, skipped


def predictions(
    sources: dict[str, dict], cells: dict[str, list[str]], predictors: tuple[str, ...] = PREDICTORS
) -> dict[str, dict]:
    """{predictor: {"scores": {cell: predicted score}, "ranking": [cells, best first]}}."""
    out = {}
    for name in predictors:
        scores = {cell: max(sources[s][name] for s in used) for cell, used in cells.items()}
        out[name] = {"scores": scores, "ranking": sorted(scores, key=lambda c: -scores[c])}
    return out


def pixel_features(images: np.ndarray) -> np.ndarray:
    """N x values, 0..1: one channel when the three are equal (grey images), else all three."""
    grey = bool(np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0], images[..., 2]))
    values = images[..., :1] if grey else images
    return values.reshape(len(images), -1).astype(np.float64) / 255.0


def head_view(maps: np.ndarray, pooling: str, image_size: int, block: str) -> np.ndarray:
    """N x d: a block's output as a head on a base cut there reads it (`model.pooling`: global
    average, or flattened after the average pooling `auto` puts in front of a large map)."""
    if pooling == "gap":
        return maps.mean(axis=(1, 2))
    window = head_pool_size(*feature_map(image_size, block), pooling)
    if window > 1:  # the model's own layer, so the values match what the head sees
        import keras

        maps = np.asarray(keras.layers.AveragePooling2D(window, strides=window, padding="same")(maps))
    return maps.reshape(len(maps), -1)


def block_features(params: Params, images: np.ndarray) -> dict[str, np.ndarray]:
    """{source: N x d} for one split: the pixels (one grey channel), each block's output as a head
    there reads it (`head_view`), and each block's output averaged over the map where that differs."""
    import keras

    from pipeline.core import frozen_features
    from pipeline.core.model import ModelSpec, build_model
    from pipeline.core.weights import load_base_weights

    size = params.data.image_size
    model = build_model(
        ModelSpec(image_size=size, num_classes=2, trainable_layers=frozenset()),
        load_base_weights(params.model.weights).arrays,
    )
    extractor = keras.Model(model.input, [model.get_layer(f"{block}_pool").output for block in CUT_POINTS])
    parts: dict[str, list[np.ndarray]] = {}
    batch = frozen_features.extraction_batch_size(size)
    for start in range(0, len(images), batch):  # batch by batch: five full maps of every image would not fit
        maps = extractor(np.asarray(images[start : start + batch], dtype=np.float32), training=False)
        for block, values in zip(CUT_POINTS, (np.asarray(m) for m in maps), strict=True):
            view = head_view(values, params.model.pooling, size, block).astype(np.float32)
            parts.setdefault(block, []).append(view)
            if view.shape[1] != values.shape[-1]:
                parts.setdefault(f"{block}{GAP}", []).append(values.mean(axis=(1, 2)))
    return {PIXELS: pixel_features(images), **{name: np.concatenate(chunks) for name, chunks in parts.items()}}


def relative_gradient_norms(params: Params, images: np.ndarray, labels: np.ndarray, classes: int) -> dict[str, float]:
    """{conv layer: mean of |dL/dW| / |W| over RGN_BATCHES batches (fewer on few images)} of the
    kernels, with a fresh (seeded) linear head on the flattened base at the pretrained weights;
    cross-entropy loss."""
    import keras
    import tensorflow as tf

    from pipeline.core.model import ModelSpec, build_model
    from pipeline.core.weights import load_base_weights

    keras.utils.set_random_seed(params.seed)
    tf.config.experimental.enable_op_determinism()  # the same bytes on a rerun, as the training's
    model = build_model(
        ModelSpec(image_size=params.data.image_size, num_classes=classes, trainable_layers=frozenset(CONV_LAYERS)),
        load_base_weights(params.model.weights).arrays,
    )
    kernels = {name: model.get_layer(name).kernel for name in CONV_LAYERS}
    loss = keras.losses.SparseCategoricalCrossentropy()
    order = np.random.default_rng(params.seed).permutation(len(images))
    totals = dict.fromkeys(CONV_LAYERS, 0.0)
    batches = min(RGN_BATCHES, -(-len(images) // RGN_BATCH_SIZE))  # fewer on a small training split
    for batch in range(batches):
        rows = order[batch * RGN_BATCH_SIZE : (batch + 1) * RGN_BATCH_SIZE]
        with tf.GradientTape() as tape:
            value = loss(labels[rows], model(np.asarray(images[rows], dtype=np.float32), training=False))
        gradients = tape.gradient(value, list(kernels.values()))
        for (name, kernel), gradient in zip(kernels.items(), gradients, strict=True):
            totals[name] += float(tf.norm(gradient) / tf.norm(kernel)) / batches
    return totals


def capped_rows(params: Params, rows: np.ndarray) -> np.ndarray:
    """At most MAX_IMAGES of `rows` (sorted), drawn with `seed` (the Gram-space scores cost n^2 x d)."""
    if len(rows) <= MAX_IMAGES:
        return rows
    return np.sort(np.asarray(rows)[np.random.default_rng(params.seed).permutation(len(rows))[:MAX_IMAGES]])


def capped(params: Params, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most MAX_IMAGES of a split (`capped_rows`)."""
    rows = capped_rows(params, np.arange(len(labels)))
    return images[rows], labels[rows]


def transfer_helps(sources: dict[str, dict]) -> dict | None:
    """ "Does transfer help?": the ridge probe on the best pretrained source against the probe on the
    pixels (None on random weights, where the pixels are the only source)."""
    best = max((s for s in sources if s != PIXELS), key=lambda s: sources[s]["ridge_probe"], default=None)
    if best is None:
        return None
    probe, pixels = sources[best]["ridge_probe"], sources[PIXELS]["ridge_probe"]
    return {"best_source": best, "probe": probe, "pixels_probe": pixels, "difference": probe - pixels}


def source_features(params: Params, images: np.ndarray) -> dict[str, np.ndarray]:
    """{source: N x d}: `block_features`, or the pixels alone on random weights."""
    return {PIXELS: pixel_features(images)} if params.model.weights == "none" else block_features(params, images)


def sample_efficiency(params: Params, cells: dict[str, list[str]]) -> dict[str, dict]:
    """{str(n): {"images", "seeds", "sources", "predictions", "transfer_helps", "not_scored"}} per
    size of the sample-efficiency study ({} when it is off): every source scored on the very
    training subset each of the study's seeds trains on (`splits.study_subset` of the study's pool,
    the draw `train` makes) against the pool's validation split, the scores averaged over the
    seeds (as the measured accuracies are); then each strategy of params.yaml predicted from them as
    in the main comparison."""
    settings = params.studies.sample_efficiency
    if not settings.train_per_class:
        return {}
    pool = sample_efficiency_pool(params, max(settings.train_per_class))
    (x_train, y_train), (x_val, y_val) = pool.splits["train"], capped(params, *pool.splits["val"])
    train, val = source_features(params, x_train), source_features(params, x_val)
    strategies = {name: cells[name] for name in params.variants if name in cells}
    out = {}
    for n in sorted(settings.train_per_class):
        used = tuple(p for p in PREDICTORS if n >= 2 or p != "gbc")  # GBC needs a variance within each class
        subsets = [capped_rows(params, study_subset(params, y_train, n, seed)) for seed in settings.seeds]
        runs = [
            {s: score_source((train[s][rows], y_train[rows]), (val[s], y_val), used) for s in train} for rows in subsets
        ]
        sources = {s: {p: float(np.mean([run[s][p] for run in runs])) for p in used} for s in train}
        out[str(n)] = {
            "images": {"train": len(subsets[0]), "val": len(y_val)},
            "seeds": list(settings.seeds),
            "sources": sources,
            "predictions": predictions(sources, strategies, used),
            "transfer_helps": transfer_helps(sources),
            "not_scored": {} if "gbc" in used else {"gbc": "one image per class has no within-class variance"},
        }
    return out


def compute(params: Params, prepared: Path) -> dict:
    """Everything `scores.json` holds (module docstring)."""
    start = time.perf_counter()
    (x_train, y_train), (x_val, y_val) = (capped(params, *load_split(prepared, s)) for s in ("train", "val"))
    classes = len(load_summary(prepared)["class_names"])
    train, val = source_features(params, x_train), source_features(params, x_val)
    gradients = {} if params.model.weights == "none" else relative_gradient_norms(params, x_train, y_train, classes)
    forward = time.perf_counter() - start
    sources = {name: score_source((train[name], y_train), (val[name], y_val)) for name in train}
    cells, skipped = candidates(params)
    main_done = time.perf_counter()
    sizes = sample_efficiency(params, cells)
    by_block = {block: float(np.mean([gradients[c] for c in BLOCKS[block]])) for block in BLOCKS if gradients}
    return {
        "images": {"train": len(y_train), "val": len(y_val)},
        "sources": sources,
        "strategy_sources": cells,
        "not_predicted": skipped,
        "predictions": predictions(sources, cells),
        "relative_gradient_norm": {"per_layer": gradients, "per_block": by_block},
        "auto_rgn_block": max(by_block, key=by_block.get) if by_block else None,
        "transfer_helps": transfer_helps(sources),
        "sample_efficiency": sizes,
        "seconds": {
            "forward_and_gradients": round(forward, 2),
            "sample_efficiency": round(time.perf_counter() - main_done, 2),
            "total": round(time.perf_counter() - start, 2),
        },
    }


def _log(record: dict, tags: dict, params: Params) -> None:
    settings = {"weights": params.model.weights, "image_size": params.data.image_size, **record["images"]}
    with tracking.run("predict", tags={**tags, "stage": "predict"}, params=settings):
        tracking.log_metrics(metric_names.predictions(record, PREDICTORS))
        tracking.log_text(json.dumps(record, indent=2, sort_keys=True), SCORES_FILE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", required=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    ensure_writable(args.out, "--out")
    tracking.open_store(params.mlflow, args.params)
    record = compute(params, args.prepared)
    with atomic_dir(args.out) as tmp:
        _log(record, tracking.environment_tags(), params)
        write_json(tmp / SCORES_FILE, record)
    for name in PREDICTORS:
        print(f"[predict] {name}: " + " > ".join(record["predictions"][name]["ranking"]), flush=True)
    for n, size in record["sample_efficiency"].items():
        print(
            f"[predict] n={n} per class, ridge probe: " + " > ".join(size["predictions"]["ridge_probe"]["ranking"]),
            flush=True,
        )
    print(f"[predict] {record['seconds']['total']:.1f}s; written to {args.out}", flush=True)


if __name__ == "__main__":
    run_stage(main)
