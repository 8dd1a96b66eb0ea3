"""Two-phase fine-tuning, block-wise learning rates, weight drift and pool subsets in the shared
training function."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest

from pipeline.core.fit import Splits, fit_variant
from pipeline.core.frozen_features import FeatureCache
from pipeline.core.model import ModelSpec, build_model, compile_model
from pipeline.core.results import TIMING_COLUMNS
from pipeline.core.vgg16 import BLOCKS, resolve_trainable
from pipeline.core.weight_drift import block_drift
from tests.conftest import colour_splits, run_config

DRIFTS = [f"drift_{b}" for b in BLOCKS]


@pytest.fixture(scope="module")
def splits():
    return colour_splits(seed=1, train_per_class=10)


def _strip(rows, keep=("loss", "accuracy", "val_loss", "val_accuracy")):
    return [{k: row[k] for k in keep} for row in rows]


def test_warmup_epochs_train_the_head_exactly_like_the_frozen_strategy_then_fine_tune(hed, splits):
    two_phase = fit_variant(run_config(["block5"], warmup_epochs=2, max_epochs=4), hed, splits, "d")
    frozen = fit_variant(run_config("none", max_epochs=2), hed, splits, "d")

    history = two_phase.history
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]  # one continuous epoch axis
    assert [row["phase"] for row in history] == ["warmup", "warmup", "main", "main"]
    assert [row["images_seen"] for row in history] == [30, 60, 90, 120]
    # the warm-up is the frozen strategy's training, bit for bit (same seed, head, features)
    assert _strip(history[:2]) == _strip(frozen.history)
    # no conv weight moves during the warm-up; block5 moves after it, nothing else ever does
    assert all(row[d] == 0.0 for row in history[:2] for d in DRIFTS)
    assert all(row["drift_block5"] > 0 for row in history[2:])
    assert all(row[d] == 0.0 for row in history for d in DRIFTS[:4])
    assert (
        two_phase.path
        == "warm-up cached-features (cut after block5_pool); then cached-features (cut after block4_pool)"
    )
    assert two_phase.frozen_weights_unchanged
    assert two_phase.warmup_epochs == 2


def test_final_weight_drift_is_measured_from_the_weights_and_exactly_zero_for_frozen_blocks(hed, splits):
    result = fit_variant(run_config(["block5_conv3"]), hed, splits, "d")
    by_hand = {}
    for block, layers in BLOCKS.items():
        now = [w.astype(np.float64) for name in layers for w in result.model.get_layer(name).get_weights()]
        start = [w.astype(np.float64) for name in layers for w in hed.arrays[name]]
        moved = sum(np.sum((a - b) ** 2) for a, b in zip(now, start, strict=True))
        by_hand[block] = np.sqrt(moved / sum(np.sum(b**2) for b in start))
    assert result.weight_drift == pytest.approx(by_hand, rel=1e-9, abs=0)
    assert [result.weight_drift[b] for b in ("block1", "block2", "block3", "block4")] == [0.0] * 4
    assert 0 < result.weight_drift["block5"] < 0.1  # one layer of three, a few small Adam steps
    # the kept epoch's weights are the ones measured: the last history row of that epoch agrees
    best_row = result.history[result.best_epoch - 1]
    assert best_row["drift_block5"] == pytest.approx(result.weight_drift["block5"], rel=1e-6)


def test_block_drift_of_a_model_against_itself_is_zero_and_scales_linearly():
    model = build_model(ModelSpec(image_size=32, num_classes=2, trainable_layers=frozenset()), None)
    start = {b: [w.copy() for n in layers for w in model.get_layer(n).get_weights()] for b, layers in BLOCKS.items()}
    assert set(block_drift(model, start).values()) == {0.0}
    layer = model.get_layer("block2_conv1")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * 1.5, bias * 1.5])  # block2 = conv1 + conv2: only conv1 moved by 50%
    drift = block_drift(model, start)
    conv1 = np.sum(kernel.astype(np.float64) ** 2) + np.sum(bias.astype(np.float64) ** 2)
    conv2 = sum(np.sum(w.astype(np.float64) ** 2) for w in model.get_layer("block2_conv2").get_weights())
    assert drift["block2"] == pytest.approx(0.5 * np.sqrt(conv1 / (conv1 + conv2)), rel=1e-6)
    assert drift["block1"] == drift["block3"] == 0.0


def test_blockwise_learning_rate_scales_the_first_adam_step_of_that_block_only(hed):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(4, 32, 32, 3)).astype(np.float32)
    y = np.array([0, 1, 0, 1])
    layers = resolve_trainable(["block4_conv3", "block5"])
    deltas = []
    for multipliers in (None, {"block5": 0.1}):
        keras.utils.set_random_seed(0)
        model = build_model(
            ModelSpec(
                image_size=32,
                num_classes=2,
                trainable_layers=layers,
                head_units=0,
                pooling="flatten",
                dropout=0.0,
                augmentation=False,
                head_norm="none",
            ),
            hed.arrays,
        )
        before = {v.path: np.array(v.numpy()) for v in model.trainable_weights}
        compile_model(model, 1e-3, layers, multipliers=multipliers)
        model.train_on_batch(x, y)
        deltas.append({v.path: np.array(v.numpy()) - before[v.path] for v in model.trainable_weights})
    plain, scaled = deltas
    for path in plain:
        if path.startswith("block5"):
            # (w + step) - w carries the float32 rounding of w: up to one ulp of w each time
            ulp = np.spacing(np.abs(before[path]).astype(np.float32))
            assert np.all(np.abs(scaled[path] - 0.1 * plain[path]) <= 1e-4 * np.abs(plain[path]) + 2 * ulp)
            assert np.abs(plain[path]).max() > 0
        else:  # block4_conv3 and the head: the plain rate
            np.testing.assert_array_equal(scaled[path], plain[path])


def test_training_on_a_pool_subset_equals_training_on_that_subset(hed, splits, tmp_path):
    """The sample-efficiency study caches features of the whole pool and trains on rows of it."""
    index = np.array([0, 3, 4, 11, 12, 19, 25, 28])  # sorted, like nested_subset gives
    subset = Splits((splits.train[0][index], splits.train[1][index]), splits.val, splits.test)
    pooled = dataclasses.replace(splits, train_index=index)
    config = run_config(["block5_conv3"], max_epochs=2)
    cache = FeatureCache(tmp_path)
    from_pool = fit_variant(config, hed, pooled, "pool-sha", cache)
    direct = fit_variant(config, hed, subset, "subset-sha", cache)
    without_timing = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in from_pool.history]
    assert without_timing == [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in direct.history]
    assert from_pool.history[0]["images_seen"] == len(index)
    np.testing.assert_array_equal(from_pool.test_probabilities, direct.test_probabilities)
    # the pool's features were cached whole (30 rows), the subset's separately (8 rows)
    sizes = sorted(np.load(p, mmap_mode="r").shape[0] for p in tmp_path.glob("*/train.npy"))
    assert sizes == [8, 30]
