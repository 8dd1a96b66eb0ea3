"""Surgical fine-tuning (Lee et al., ICLR 2023: train exactly one block, the rest frozen) is a
strategy the params already express, `trainable: [blockK]`, for every K. Each of the five trains
exactly its block's weights (hand-counted parameters), leaves every other conv weight
bit-identical, and takes the cached fast path whenever there is a frozen prefix below it: block K
trains on cached `block{K-1}_pool` features, block1 (nothing below it) end to end."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from pipeline.core import frozen_features
from pipeline.core.fit import fit_variant
from pipeline.core.model import ModelSpec, build_model
from pipeline.core.params import load_params
from pipeline.core.vgg16 import BLOCKS, FILTERS
from tests.conftest import REPO, colour_splits, run_config

# conv weights + biases of each block, counted by hand from VGG16's 3x3 convs:
# block1: (3*9*64 + 64) + (64*9*64 + 64); block2: (64*9*128 + 128) + (128*9*128 + 128); ...
BLOCK_PARAMETERS = {
    "block1": 1_792 + 36_928,
    "block2": 73_856 + 147_584,
    "block3": 295_168 + 2 * 590_080,
    "block4": 1_180_160 + 2 * 2_359_808,
    "block5": 3 * 2_359_808,
}
BLOCK_NAMES = list(BLOCKS)


@pytest.fixture(scope="module")
def tiny_splits():
    return colour_splits(seed=0, train_per_class=8)


@pytest.fixture(scope="module")
def surgical(tmp_path_factory):
    """The five strategies as params.yaml writes them, `surgical_blockK: {trainable: [blockK]}`,
    beside the default ones, loaded and validated by the pipeline's own loader."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["variants"].update({f"surgical_{block}": {"trainable": [block]} for block in BLOCK_NAMES})
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return {
        name.removeprefix("surgical_"): v
        for name, v in load_params(path).variants.items()
        if name.startswith("surgical_")
    }


def test_the_hand_counts_are_vgg16s_conv_base():
    assert sum(BLOCK_PARAMETERS.values()) == 14_714_688  # keras.applications.VGG16(include_top=False)
    for block, count in BLOCK_PARAMETERS.items():  # and each matches the filter table the model uses
        channels = [3, *FILTERS.values()][BLOCK_NAMES.index(block)]
        layers = len(BLOCKS[block])
        assert count == 9 * channels * FILTERS[block] + FILTERS[block] + (layers - 1) * (
            9 * FILTERS[block] ** 2 + FILTERS[block]
        )


@pytest.mark.parametrize("block", BLOCK_NAMES)
def test_a_surgical_strategy_trains_exactly_its_blocks_parameters(surgical, block):
    layers = surgical[block].layers
    assert layers == frozenset(BLOCKS[block])
    model = build_model(ModelSpec(image_size=32, num_classes=3, trainable_layers=layers, head_units=16), None)
    head = build_model(ModelSpec(image_size=32, num_classes=3, head_units=16), None)
    count = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    head_count = sum(int(np.prod(v.shape)) for v in head.trainable_weights)
    assert count - head_count == BLOCK_PARAMETERS[block]


@pytest.mark.parametrize("block", BLOCK_NAMES)
def test_a_surgical_strategy_caches_the_frozen_prefix_below_its_block(surgical, block):
    layers = surgical[block].layers
    model = build_model(ModelSpec(image_size=32, num_classes=3, trainable_layers=layers), None)
    below = BLOCK_NAMES.index(block) - 1
    expected = None if below < 0 else f"{BLOCK_NAMES[below]}_pool"
    assert frozen_features.cut_layer(model, layers) == expected


@pytest.mark.parametrize("block", BLOCK_NAMES)
def test_training_one_block_changes_it_and_leaves_every_other_conv_weight_bit_identical(hed, tiny_splits, block):
    config = run_config([block], max_epochs=1, learning_rate=1e-3, cache_features=True)
    result = fit_variant(config, hed, tiny_splits, "data")
    below = BLOCK_NAMES.index(block) - 1
    assert result.path == ("end-to-end" if below < 0 else f"cached-features (cut after {BLOCK_NAMES[below]}_pool)")
    assert result.frozen_weights_unchanged
    for other in BLOCK_NAMES:
        for name in BLOCKS[other]:
            got = result.model.get_layer(name).get_weights()
            if other == block:
                assert not np.array_equal(got[0], hed.arrays[name][0]), name
            else:
                for array, want in zip(got, hed.arrays[name], strict=True):
                    np.testing.assert_array_equal(array, want)


def test_a_middle_block_on_cached_features_trains_like_end_to_end(hed, tiny_splits):
    """block3 on cached block2_pool features: the same epochs as the whole model on images."""
    cached = fit_variant(run_config(["block3"], max_epochs=2, cache_features=True), hed, tiny_splits, "data")
    end_to_end = fit_variant(run_config(["block3"], max_epochs=2, cache_features=False), hed, tiny_splits, "data")
    assert cached.path == "cached-features (cut after block2_pool)" and end_to_end.path == "end-to-end"
    for a, b in zip(cached.history, end_to_end.history, strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    np.testing.assert_allclose(cached.test_probabilities, end_to_end.test_probabilities, atol=1e-4)
