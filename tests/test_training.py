"""The shared training function: the cached-feature path equals end-to-end training, frozen
weights stay bit-identical, runs are reproducible, and the best epoch's weights are kept."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core import frozen_features
from pipeline.core.fit import NonFiniteLossError, Splits, fit_variant
from pipeline.core.model import ModelSpec, build_model
from pipeline.core.results import TIMING_COLUMNS
from pipeline.core.vgg16 import BLOCKS, resolve_trainable
from tests.conftest import colour_splits, run_config


@pytest.fixture(scope="module")
def tiny_splits():
    return colour_splits(seed=0, train_per_class=8)


def _config(spec, **overrides):
    return run_config(spec, **{"learning_rate": 1e-4, "max_epochs": 2, "seed": 3, **overrides})


def _without_timing(history):
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in history]


@pytest.mark.parametrize("spec", ["none", ["block5_conv3"], ["block5"], ["block4", "block5"]])
def test_split_model_predicts_like_the_full_model(hed, tiny_splits, spec):
    model = build_model(
        ModelSpec(
            image_size=32,
            num_classes=3,
            trainable_layers=resolve_trainable(spec),
            head_units=16,
            dropout=0.2,
            pooling="flatten",
            augmentation=False,
            head_norm="none",
        ),
        hed.arrays,
    )
    cut = frozen_features.cut_layer(model, resolve_trainable(spec))
    split = frozen_features.split_model(model, cut)
    images = tiny_splits.train[0]
    end_to_end = frozen_features.predict(model, images, 8)
    cached = frozen_features.predict(split.suffix, frozen_features.predict(split.prefix, images, 8), 8)
    np.testing.assert_allclose(cached, end_to_end, atol=1e-4)
    # the halves share the full model's layer objects: training one trains the other
    assert split.suffix.get_layer("predictions") is model.get_layer("predictions")


def test_cut_points_follow_the_first_trainable_layer(hed):
    def cut(spec):
        model = build_model(ModelSpec(image_size=32, num_classes=3, trainable_layers=resolve_trainable(spec)), None)
        return frozen_features.cut_layer(model, resolve_trainable(spec))

    assert cut("none") == "block5_pool"
    assert cut(["block5_conv3"]) == "block5_conv2"
    assert cut(["block5"]) == "block4_pool"
    assert cut("all") is None  # block1_conv1 trains: nothing to cache


@pytest.mark.parametrize("spec", ["none", ["block5"]])
def test_cached_training_gives_the_end_to_end_history(hed, tiny_splits, spec):
    cached = fit_variant(_config(spec, cache_features=True), hed, tiny_splits, "data")
    end_to_end = fit_variant(_config(spec, cache_features=False), hed, tiny_splits, "data")
    assert cached.path.startswith("cached-features") and end_to_end.path == "end-to-end"
    for a, b in zip(cached.history, end_to_end.history, strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    np.testing.assert_allclose(cached.test_probabilities, end_to_end.test_probabilities, atol=1e-4)


def test_frozen_weights_are_bit_identical_after_training(hed, tiny_splits):
    result = fit_variant(_config(["block5_conv3"], cache_features=False, learning_rate=1e-3), hed, tiny_splits, "data")
    assert result.frozen_weights_unchanged
    for name in (*BLOCKS["block1"], "block5_conv2"):
        for got, want in zip(result.model.get_layer(name).get_weights(), hed.arrays[name], strict=True):
            np.testing.assert_array_equal(got, want)
    trained_kernel = result.model.get_layer("block5_conv3").get_weights()[0]
    assert not np.array_equal(trained_kernel, hed.arrays["block5_conv3"][0])


def test_same_seed_reproduces_history_and_predictions(hed, tiny_splits):
    first = fit_variant(_config(["block5"], cache_features=False), hed, tiny_splits, "data")
    second = fit_variant(_config(["block5"], cache_features=False), hed, tiny_splits, "data")
    assert _without_timing(first.history) == _without_timing(second.history)
    np.testing.assert_array_equal(first.test_probabilities, second.test_probabilities)
    other_seed = fit_variant(_config(["block5"], cache_features=False, seed=4), hed, tiny_splits, "data")
    assert _without_timing(other_seed.history) != _without_timing(first.history)


def test_returned_model_holds_the_best_validation_epoch(hed, tiny_splits):
    """min_delta larger than any change: only epoch 1 counts as an improvement, epochs 2-4 train on,
    and the returned model must be epoch 1's, not the last one."""
    config = _config("none", max_epochs=10, patience=3, min_delta=100.0, learning_rate=3e-3)
    result = fit_variant(config, hed, tiny_splits, "data")
    assert result.best_epoch == 1 and len(result.history) == 4 and result.stopped_early
    first, last = result.history[0], result.history[-1]
    assert first["val_loss"] != pytest.approx(last["val_loss"], rel=1e-3)  # restoring is observable
    result.model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    loss, accuracy = result.model.evaluate(*tiny_splits.val, batch_size=8, verbose=0)
    assert loss == pytest.approx(first["val_loss"], rel=1e-4) and accuracy == pytest.approx(first["val_accuracy"])
    assert result.best_val_accuracy == first["val_accuracy"]


def test_early_stopping_ends_the_run_patience_epochs_after_the_best(hed, tiny_splits):
    result = fit_variant(_config("none", max_epochs=40, patience=2, learning_rate=1e-2), hed, tiny_splits, "data")
    assert result.stopped_early and len(result.history) < 40
    assert len(result.history) == result.best_epoch + 2
    later = [row["val_loss"] for row in result.history[result.best_epoch :]]
    assert min(later) >= result.history[result.best_epoch - 1]["val_loss"]  # no later epoch improved


def test_a_run_that_reaches_max_epochs_is_not_stopped_early(hed, tiny_splits):
    result = fit_variant(_config("none", max_epochs=3, patience=5), hed, tiny_splits, "data")
    assert len(result.history) == 3 and not result.stopped_early


def test_history_rows_count_epochs_and_images(hed, tiny_splits):
    result = fit_variant(_config("none", max_epochs=3), hed, tiny_splits, "data")
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert [row["images_seen"] for row in result.history] == [24, 48, 72]
    cumulative = [row["cumulative_seconds"] for row in result.history]
    assert cumulative == sorted(cumulative) and all(row["epoch_seconds"] > 0 for row in result.history)


def test_nan_loss_stops_the_run_with_a_clear_error(hed, tiny_splits):
    images, labels = tiny_splits.train
    poisoned = images.astype(np.float32)
    poisoned[0, 0, 0, 0] = np.nan  # one NaN pixel makes the loss NaN in the first epoch
    splits = Splits((poisoned, labels), tiny_splits.val)
    with pytest.raises(NonFiniteLossError, match=r"training loss became nan at epoch 1; lower the learning rate"):
        fit_variant(_config("none", max_epochs=3), hed, splits, "data")


def test_feature_cache_is_reused_across_seeds(tmp_path, hed, tiny_splits):
    cache = frozen_features.FeatureCache(tmp_path)
    first = fit_variant(_config("none"), hed, tiny_splits, "data", feature_cache=cache)
    second = fit_variant(_config("none", seed=9), hed, tiny_splits, "data", feature_cache=cache)
    assert first.feature_seconds > 0 and second.feature_seconds == 0
    (key_dir,) = tmp_path.iterdir()
    expected = [f"{split}.{kind}" for split in ("test", "train", "val") for kind in ("json", "npy")]
    assert sorted(p.name for p in key_dir.iterdir()) == expected
    # the one-time cost is remembered: the second seed accounts for it without paying it again
    assert second.extraction_seconds == pytest.approx(first.extraction_seconds) and first.extraction_seconds > 0
    assert np.load(key_dir / "train.npy").shape == (24, 1, 1, 512)


def test_augmentation_bypasses_the_cache(hed, tiny_splits):
    result = fit_variant(_config("none", augmentation=True, max_epochs=1), hed, tiny_splits, "data")
    assert result.path == "end-to-end (augmentation on: feature cache bypassed)"
    names = [layer.name for layer in result.model.layers]
    assert names[1:5] == ["augment_flip", "augment_rotate", "augment_zoom", "preprocess"]  # before preprocessing


def _epochs_of_batches(x, y, seed: int, shuffle: bool, epochs: int = 2):
    import keras

    from pipeline.core.fit import batches

    keras.utils.set_random_seed(seed)
    dataset = batches(x, y, 8, seed, shuffle)
    return [[(xb.numpy(), yb.numpy()) for xb, yb in dataset] for _ in range(epochs)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_streamed_batches_equal_in_memory_batches(tmp_path, monkeypatch, shuffle):
    """Large inputs are read batch by batch from their memory map; the batches (order included,
    epoch after epoch) must be exactly those of the in-memory path, or results would change."""
    import pipeline.core.fit as training

    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(45, 2, 2, 3)).astype(np.float32))
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    y = rng.integers(0, 5, size=45)
    in_memory = _epochs_of_batches(x, y, seed=7, shuffle=shuffle)
    monkeypatch.setattr(training, "STREAM_BYTES", 0)
    streamed = _epochs_of_batches(x, y, seed=7, shuffle=shuffle)
    assert [len(epoch) for epoch in streamed] == [6, 6]  # 45 rows in batches of 8
    for epoch_a, epoch_b in zip(in_memory, streamed, strict=True):
        for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b, strict=True):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    if shuffle:  # reshuffled each epoch, and really shuffled
        assert not np.array_equal(streamed[0][0][1], streamed[1][0][1])


def test_cached_features_file_equals_the_prefix_output(tmp_path, hed, tiny_splits):
    model = build_model(ModelSpec(image_size=32, num_classes=3, trainable_layers=frozenset()), hed.arrays)
    prefix = frozen_features.split_model(model, "block4_pool").prefix
    images = tiny_splits.train[0]
    cache = frozen_features.FeatureCache(tmp_path)
    cached, seconds = cache.get_or_compute("k", "train", prefix, images, 7)  # batches that do not divide N
    assert isinstance(cached, np.memmap) and seconds > 0
    np.testing.assert_array_equal(cached, frozen_features.predict(prefix, images, 7))
    # the extraction batch size is a speed setting only: other batch sizes give the same bits
    np.testing.assert_array_equal(
        cached, frozen_features.predict(prefix, images, frozen_features.extraction_batch_size(32))
    )
    assert frozen_features.extraction_batch_size(32) == 128 and frozen_features.extraction_batch_size(224) == 20
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["train.json", "train.npy"]  # no temporaries
    assert cache.extraction_seconds("k", "train") == pytest.approx(seconds)


def test_training_on_streamed_inputs_gives_the_same_history(tmp_path, monkeypatch, hed, tiny_splits):
    import pipeline.core.fit as training

    def run():
        cache = frozen_features.FeatureCache(tmp_path)
        result = fit_variant(_config(["block5"], max_epochs=2), hed, tiny_splits, "data", feature_cache=cache)
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in result.history]

    in_memory = run()
    monkeypatch.setattr(training, "STREAM_BYTES", 0)
    assert run() == in_memory


def test_mixed_precision_option_computes_in_bfloat16_and_restores_the_policy(tmp_path, hed, tiny_splits):
    import keras

    cache = frozen_features.FeatureCache(tmp_path)
    result = fit_variant(_config(["block5"], max_epochs=1, mixed_precision=True), hed, tiny_splits, "data", cache)
    assert result.model.get_layer("block5_conv1").compute_dtype == "bfloat16"
    assert result.model.get_layer("block5_conv1").kernel.dtype == "float32"  # weights stay float32
    assert result.test_probabilities.dtype == np.float32  # the test split's softmax, cast back
    assert result.model.get_layer("predictions").compute_dtype == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"
    # its features are cached apart from the float32 ones
    fit_variant(_config(["block5"], max_epochs=1), hed, tiny_splits, "data", cache)
    assert len(list(tmp_path.iterdir())) == 2
