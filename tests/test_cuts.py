"""Where the network is cut: a base that ends after block b (`variants.<name>.cut_after`), its
parameter counts, its cached fast path, the head's pooling rule, its FLOPs and the params checks."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import yaml

from pipeline.analysis import cost
from pipeline.core import frozen_features
from pipeline.core.fit import fit_variant
from pipeline.core.model import ModelSpec, build_model, count_parameters
from pipeline.core.params import parse_params
from pipeline.core.vgg16 import CONV_LAYERS, head_features, head_pool_size, kept_layers, resolve_trainable
from pipeline.core.weight_drift import block_drift, snapshot
from pipeline.runtime.errors import ConfigError
from pipeline.stages.baselines import average_pool
from pipeline.stages.report.cuts import kind
from pipeline.stages.report.studies import depth_name
from tests.conftest import REPO, colour_splits, run_config

RAW = yaml.safe_load((REPO / "params.yaml").read_text())

# VGG16's conv parameters per block (kernels 3x3xC_in x C_out + biases), cumulated up to each cut
BASE_UP_TO = {"block1": 38_720, "block2": 260_160, "block3": 1_735_488, "block4": 7_635_264, "block5": 14_714_688}


def _model(cut: str, trainable=frozenset(), image_size: int = 32, **head) -> keras.Model:
    options = head
    return build_model(
        ModelSpec(image_size=image_size, num_classes=10, trainable_layers=trainable, cut_after=cut, **options), None
    )


@pytest.mark.parametrize("cut", list(BASE_UP_TO))
def test_a_base_cut_after_a_block_has_exactly_that_blocks_parameters(cut):
    counts = count_parameters(_model(cut))
    base = sum(c["trainable"] + c["non_trainable"] for b, c in counts["per_block"].items() if b != "head")
    assert base == BASE_UP_TO[cut]
    removed = list(BASE_UP_TO)[list(BASE_UP_TO).index(cut) + 1 :]
    assert all(counts["per_block"][b] == {"trainable": 0, "non_trainable": 0} for b in removed)
    side = 32 // 2 ** (list(BASE_UP_TO).index(cut) + 1)
    channels = {"block1": 64, "block2": 128, "block3": 256, "block4": 512, "block5": 512}[cut]
    assert counts["trainable"] == side * side * channels * 10 + 10  # the bare head: Flatten -> Dense(10)
    assert counts["total"] == BASE_UP_TO[cut] + counts["trainable"]


def test_the_blocks_above_the_cut_are_not_built():
    names = [layer.name for layer in _model("block3").layers]
    assert "block3_pool" in names and not any(n.startswith(("block4", "block5")) for n in names)
    assert names[-2:] == ["flatten", "predictions"]


@pytest.mark.parametrize("cut", list(BASE_UP_TO))
def test_the_cached_fast_path_cuts_at_the_kept_bases_end_or_below_its_first_trainable_layer(cut):
    assert frozen_features.cut_layer(_model(cut), frozenset()) == f"{cut}_pool"
    top = kept_layers(cut)[-1]
    below = CONV_LAYERS[CONV_LAYERS.index(top) - 1]
    assert frozen_features.cut_layer(_model(cut, frozenset({top})), frozenset({top})) == below


@pytest.fixture(scope="module")
def tiny_splits():
    return colour_splits(seed=0, train_per_class=8)


@pytest.mark.parametrize("spec", ["none", ["block3"]])
def test_cached_training_of_a_cut_base_gives_the_end_to_end_history(hed, tiny_splits, spec):
    def fit(cache: bool):
        config = run_config(spec, learning_rate=1e-4, max_epochs=2, seed=3, cache_features=cache, cut_after="block3")
        return fit_variant(config, hed, tiny_splits, "data")

    cached, end_to_end = fit(True), fit(False)
    expected_cut = "block3_pool" if spec == "none" else "block2_pool"
    assert cached.path == f"cached-features (cut after {expected_cut})" and end_to_end.path == "end-to-end"
    for a, b in zip(cached.history, end_to_end.history, strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    np.testing.assert_allclose(cached.test_probabilities, end_to_end.test_probabilities, atol=1e-4)
    assert cached.frozen_weights_unchanged
    assert cached.weight_drift["block4"] == cached.weight_drift["block5"] == 0.0  # removed: nothing to move


def test_auto_pooling_flattens_up_to_the_classic_head_and_average_pools_beyond():
    # 32x32: every cut's map is small enough to flatten, as the classic head does
    assert [head_features(32, cut, "auto") for cut in BASE_UP_TO] == [16_384, 8_192, 4_096, 2_048, 512]
    # 224x224: block5 keeps the classic 7x7x512 = 25,088; deeper maps are pooled to the finest grid that fits
    assert [head_features(224, cut, "auto") for cut in BASE_UP_TO] == [23_104, 25_088, 12_544, 25_088, 25_088]
    assert [head_pool_size(s, c, "auto") for s, c in ((112, 64), (56, 128), (28, 256), (14, 512), (7, 512))] == [
        6,
        4,
        4,
        2,
        1,
    ]
    assert head_features(224, "block3", "flatten") == 200_704 and head_features(224, "block3", "gap") == 256
    model = _model("block3", image_size=224, pooling="auto")
    assert model.get_layer("head_pool").pool_size == (4, 4) and model.get_layer("flatten").output.shape[1] == 12_544


@pytest.mark.parametrize(("side", "window"), [(7, 2), (28, 3), (28, 4), (112, 6), (9, 4)])
def test_the_probes_pooling_equals_keras_average_pooling_with_same_padding(side, window):
    maps = np.random.default_rng(side).random((2, side, side, 3)).astype(np.float32)
    expected = np.asarray(keras.layers.AveragePooling2D(window, strides=window, padding="same")(maps))
    np.testing.assert_allclose(average_pool(maps, window), expected.reshape(2, -1), atol=1e-6)


def test_drift_of_a_cut_model_is_zero_for_the_removed_blocks():
    model = _model("block2")
    initial = snapshot(model)
    assert set(initial) == {"block1", "block2"}
    assert block_drift(model, initial) == {"block1": 0.0, "block2": 0.0, "block3": 0.0, "block4": 0.0, "block5": 0.0}


def _params(**variant):
    return parse_params({**RAW, "variants": {"cut": variant}, "report": {**RAW["report"], "baseline": "cut"}})


def test_a_layer_above_the_cut_cannot_train():
    with pytest.raises(ConfigError) as error:
        _params(cut_after="block3", trainable=["block3", "block4_conv1"])
    assert error.value.key == "variants.cut.trainable"
    assert "block4_conv1 lie above the cut (cut_after: block3)" in error.value.problem


def test_cut_after_must_name_a_block():
    with pytest.raises(ConfigError) as error:
        _params(cut_after="block3_pool", trainable="none")
    assert error.value.key == "variants.cut.cut_after" and "block1, block2, block3, block4, block5" in str(error.value)


def test_trainable_all_means_every_kept_layer_and_multipliers_need_a_kept_block():
    params = _params(cut_after="block2", trainable="all")
    assert params.variant("cut").layers == frozenset(kept_layers("block2")) == resolve_trainable("all", "block2")
    assert params.trains_end_to_end("cut")  # block1_conv1 trains
    with pytest.raises(ConfigError) as error:
        _params(cut_after="block2", trainable="all", lr_multipliers={"block4": 0.1})
    assert error.value.key == "variants.cut.lr_multipliers.block4"
    assert "block4 is above the cut (cut_after: block2 removes it); remove the entry" in str(error.value)
    with pytest.raises(ConfigError, match="block1 does not train in this strategy"):  # kept, but frozen
        _params(cut_after="block2", trainable=["block2"], lr_multipliers={"block1": 0.1})


def test_the_depth_study_runs_every_k_at_every_cut_and_names_each_cell():
    studies = {"depth": {"k": [0, 3, 7], "cut_after": ["block3", "block5"], "seeds": [1]}}
    params = parse_params({**RAW, "studies": studies})
    cell, name = params.with_depth(3, "block3")
    assert name == "block3_top3" and cell.variant(name).cut_after == "block3"
    assert cell.variant(name).layers == frozenset(kept_layers("block3")[-3:])
    assert params.with_depth(7, "block5")[1] == "top7"
    assert depth_name("block3_top3") == "cut after block3, k = 3" and depth_name("top7") == "k = 7"
    with pytest.raises(ConfigError) as error:
        parse_params({**RAW, "studies": {"depth": {"k": [0, 9], "cut_after": ["block3"]}}})
    assert error.value.key == "studies.depth.k" and "keeps 7 conv layers" in error.value.problem


def test_flops_of_a_cut_base_stop_at_the_cut_and_its_head_sees_the_cut_features():
    layout = cost.Layout(image_size=32, pooling="auto", num_classes=10, val_images=0, test_images=0)
    layers = dict(cost.layer_flops(layout, 0, "block3"))
    assert list(layers)[-2:] == ["block3_pool", "head_output"] and "block4_conv1" not in layers
    assert layers["head_output"] == 2.0 * 4_096 * 10
    assert layers["block3_conv3"] == 2.0 * 8 * 8 * 9 * 256 * 256
    run = {"head_units": 0, "epochs_run": 1, "training_path": "cached-features (cut after block3_pool)"}
    run |= {"train_images": 100, "cut_after": "block3"}
    assert cost.run_flops(run, frozenset(), layout, test=False) == 100 * 2 * 2.0 * 4_096 * 10


def test_the_report_reads_what_trained_from_the_parameter_counts():
    def result(cut, trained):
        per_block = {b: {"trainable": 0, "non_trainable": 0} for b in BASE_UP_TO}
        for b in list(BASE_UP_TO)[: list(BASE_UP_TO).index(cut) + 1]:
            count = 5 if b in trained else 0
            per_block[b] = {"trainable": count, "non_trainable": 5 - count}
        return {"cut_after": cut, "parameters": {"per_block": per_block}}

    assert kind(result("block3", [])) == "head only"
    assert kind(result("block3", ["block3"])) == "top kept block + head"
    assert kind(result("block3", ["block1", "block2", "block3"])) == "whole kept base + head"
    assert kind(result("block5", ["block4", "block5"])) == "other"
    last_layers = result("block5", ["block5"])
    last_layers["parameters"]["per_block"]["block5"] = {"trainable": 2, "non_trainable": 3}  # block5_conv3 only
    assert kind(last_layers) == "part of the top kept block + head"


def test_pooling_benchmark_measures_each_distinct_pooling_once_and_marks_the_auto_one():
    from pipeline.tools.bench.pooling import poolings, table

    assert poolings(4, 256) == {"flatten": 1, "2x2 grid": 2, "global average": None}  # block3 at 32x32
    assert poolings(2, 512) == {"flatten": 1, "global average": None}  # a 2x2 grid is the flattened map
    assert poolings(1, 512) == {"flatten": 1}  # block5 at 32x32: every pooling is the same 512 values
    # block3 at 224x224: 200,704 values flattened; auto averages 4x4 windows to a 7x7 grid (12,544)
    assert poolings(28, 256) == {"flatten": 1, "2x2 grid": 14, "global average": None, "4x4 average, flattened": 4}
    row = {"cut_after": "block3", "values": 4096, "val_accuracy": 0.788, "test_accuracy": 0.8015, "C": 0.1}
    text = table(
        [{**row, "pooling": "flatten", "auto": True}, {**row, "pooling": "global average", "auto": False}], 32, "hed"
    )
    assert "| block3 | flatten (auto) | 4,096 | 0.788 | 0.8015 | 0.1 |" in text
    assert "| block3 | global average | 4,096 |" in text


def test_a_head_further_than_the_tolerance_below_its_probe_is_flagged():
    from pipeline.stages.report.answer import HEAD_PROBE_TOLERANCE, head_probe_check

    probe = {"test_accuracy": 0.8015, "features": "hed conv base cut after block3, auto"}
    flagged = head_probe_check("cut3_frozen", 0.771, probe)  # the committed default run's numbers
    assert flagged.startswith(f"**Head more than {HEAD_PROBE_TOLERANCE} below its probe**: `cut3_frozen`")
    assert "0.771" in flagged and "0.801 (gap -0.030)" in flagged and "cut after block3" in flagged
    within = head_probe_check("cut2_frozen", 0.7975, {**probe, "features": "block2"})
    assert within.startswith("`cut2_frozen`") and "(gap -0.004)" in within
