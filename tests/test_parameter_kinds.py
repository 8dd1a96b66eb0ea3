"""Beyond layer freezing: which *parameters* of the trainable conv layers train (`parameters:` all,
bias, lora with lora_rank, scale_shift). Written as params.yaml writes them (the study's own
strategies, loaded by the pipeline's loader), each trains exactly its hand-counted parameters,
leaves every frozen weight bit-identical through training (warm-up phases included), and merges
into a plain VGG16 for serving that predicts what the trained model predicts."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest

from pipeline.analysis import cost
from pipeline.core.fit import RunConfig, fit_variant
from pipeline.core.model import (
    ModelSpec,
    build_model,
    check_trainable,
    count_parameters,
    merge_for_serving,
    set_trainable,
)
from pipeline.core.parameter_kinds import effective_conv_weights
from pipeline.core.params import load_params
from pipeline.core.vgg16 import CONV_LAYERS
from pipeline.runtime.errors import ConfigError
from tests.conftest import colour_splits, run_config

# (input channels, filters) of VGG16's 13 convs, written out by hand
CHANNELS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
            (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]  # fmt: skip
STUDY = load_params().studies.parameter_efficient.strategies  # the committed params.yaml's definitions


def lora_count(rank: int, layers=CHANNELS) -> int:
    """r x (9 C_in + C_out) per adapted layer: A is (3, 3, C_in, r), B is (r, C_out)."""
    return sum(rank * (9 * c_in + c_out) for c_in, c_out in layers)


def conv_trainable(spec: ModelSpec) -> int:
    """Trainable parameters of the conv base of the model `spec` builds (the head left out)."""
    counts = count_parameters(build_model(spec, None))
    return counts["trainable"] - counts["per_block"]["head"]["trainable"]


def spec_of(strategy, **head) -> ModelSpec:
    return ModelSpec(
        image_size=32,
        num_classes=3,
        trainable_layers=strategy.layers,
        parameters=strategy.parameters,
        lora_rank=strategy.lora_rank,
        **head,
    )


def test_the_hand_written_channels_are_the_built_network_and_give_the_published_counts():
    """The hand table is VGG16 as the model factory builds it (kernel shapes), and it gives the
    issue's numbers: 4,224 conv biases (BitFit) and 150,636 LoRA parameters at rank 4."""
    model = build_model(ModelSpec(image_size=32, num_classes=3), None)
    assert [tuple(model.get_layer(name).kernel.shape) for name in CONV_LAYERS] == [(3, 3, i, o) for i, o in CHANNELS]
    assert sum(c_out for _, c_out in CHANNELS) == 4_224
    assert lora_count(4) == 150_636


@pytest.mark.parametrize(
    ("name", "expected"),
    [("bias_only", 4_224), ("lora_r4", 150_636), ("scale_shift", 8_448), ("surgical_block1", 38_720)],
)
def test_each_study_strategy_trains_exactly_its_hand_counted_parameters(name, expected):
    assert conv_trainable(spec_of(STUDY[name])) == expected


def test_lora_on_some_blocks_adapts_only_their_layers_at_the_given_rank():
    spec = ModelSpec(image_size=32, num_classes=3, trainable_layers=frozenset(CONV_LAYERS[-3:]), parameters="lora",
                     lora_rank=8)  # fmt: skip
    assert conv_trainable(spec) == lora_count(8, CHANNELS[-3:]) == 122_880
    model = build_model(spec, None)
    assert {v.path for v in model.trainable_weights if v.path.startswith("block")} == {
        f"{layer}/{part}" for layer in CONV_LAYERS[-3:] for part in ("lora_kernel_a", "lora_kernel_b")
    }


@pytest.mark.parametrize("kind", ["bias", "lora", "scale_shift"])
def test_the_kernels_stay_frozen_across_a_freeze_and_unfreeze(kind):
    """Keras 3 resets every variable's flag when a layer's `trainable` is set: the warm-up phase
    (nothing trains) then the main phase must give the kind's variables again, not the kernels."""
    layers = frozenset(CONV_LAYERS)
    model = build_model(ModelSpec(image_size=32, num_classes=3, trainable_layers=layers, parameters=kind,
                                  lora_rank=2 if kind == "lora" else 0), None)  # fmt: skip
    before = {v.path for v in model.trainable_weights}
    set_trainable(model, frozenset(), kind)
    assert not [v for v in model.trainable_weights if v.path.startswith("block")]
    set_trainable(model, layers, kind)
    assert {v.path for v in model.trainable_weights} == before
    check_trainable(model, layers, kind)
    model.get_layer("block3_conv1")._kernel.trainable = True  # a kernel that would train: refused
    with pytest.raises(RuntimeError, match="unexpected \\['block3_conv1/kernel'\\]"):
        check_trainable(model, layers, kind)


@pytest.fixture(scope="module")
def trained(hed):
    """One epoch of each kind on every conv layer (end to end), and of LoRA on block5 (cached)."""
    splits = colour_splits(seed=1, train_per_class=6)
    runs = {}
    cases = [("bias", "bias", "all", 0), ("lora", "lora", "all", 4), ("scale_shift", "scale_shift", "all", 0),
             ("lora_block5", "lora", ["block5"], 2), ("scale_shift_norm", "scale_shift", ["block5"], 0)]  # fmt: skip
    for name, kind, spec, rank in cases:
        head_norm = "standardize" if name.endswith("_norm") else "none"  # statistics set from the training features
        config = run_config(
            spec,
            max_epochs=2,
            learning_rate=1e-3,
            parameters=kind,
            lora_rank=rank,
            warmup_epochs=1,
            head_norm=head_norm,
        )
        runs[name] = (config, fit_variant(config, hed, splits, "data"), splits)
    return runs


@pytest.mark.parametrize("name", ["bias", "lora", "scale_shift", "lora_block5"])
def test_training_moves_only_the_kinds_parameters(hed, trained, name):
    config, result, _ = trained[name]
    assert result.frozen_weights_unchanged
    assert result.path == (
        "warm-up cached-features (cut after block5_pool); then "
        + ("cached-features (cut after block4_pool)" if name == "lora_block5" else "end-to-end")
    )
    for layer_name in CONV_LAYERS:
        layer = result.model.get_layer(layer_name)
        kernel, bias = hed.arrays[layer_name]
        np.testing.assert_array_equal(np.asarray(layer._kernel), kernel)  # the pretrained kernel itself never moves
        if layer_name not in config.trainable_layers:
            np.testing.assert_array_equal(np.asarray(layer.bias), bias)
            continue
        if name == "bias":
            assert not np.array_equal(np.asarray(layer.bias), bias), layer_name
        elif name.startswith("lora"):
            np.testing.assert_array_equal(np.asarray(layer.bias), bias)
            assert np.any(np.asarray(layer.lora_kernel_b) != 0), layer_name  # B starts at 0: it moved
        else:
            np.testing.assert_array_equal(np.asarray(layer.bias), bias)
            assert not np.array_equal(np.asarray(layer.scale), np.ones_like(bias)), layer_name


def test_weight_drift_measures_what_the_layers_compute_with(hed, trained):
    """LoRA's pretrained kernel and bias never move, yet the block drifts: by its merged kernel
    (kernel + A @ B), measured against the pretrained weights, not against A's random start."""
    _, result, _ = trained["lora"]
    moved = size = 0.0
    for name in ("block5_conv1", "block5_conv2", "block5_conv3"):
        layer = result.model.get_layer(name)
        a = np.asarray(layer.lora_kernel_a, np.float64)  # (3, 3, C_in, r)
        delta = a.reshape(-1, layer.lora_rank) @ np.asarray(layer.lora_kernel_b, np.float64)
        merged = np.asarray(layer._kernel, np.float64) + delta.reshape((*a.shape[:3], -1))
        kernel, bias = hed.arrays[name]
        moved += float(np.sum((merged - kernel) ** 2))
        size += float(np.sum(np.float64(kernel) ** 2) + np.sum(np.float64(bias) ** 2))
    assert result.weight_drift["block5"] == pytest.approx(np.sqrt(moved / size), rel=1e-4)
    assert result.weight_drift["block5"] > 0


# the largest |p_plain - p_trained| over the test images a merge may give: LoRA and bias-only are
# exact (the merged kernel is the one the layer computed with); scale-and-shift folds two float32
# products into one, a rounding difference
# (scale_shift_norm: the head standardises its features, statistics the merged model must compute with too)
MERGE_TOLERANCE = {"bias": 0.0, "lora": 0.0, "lora_block5": 0.0, "scale_shift": 1e-5, "scale_shift_norm": 1e-5}


@pytest.mark.parametrize("name", list(MERGE_TOLERANCE))
def test_the_model_merges_into_a_plain_vgg16_that_predicts_the_same(trained, tmp_path, name):
    config, result, splits = trained[name]
    plain = merge_for_serving(result.model, config.model_spec)
    assert {type(plain.get_layer(n)) for n in CONV_LAYERS} == {keras.layers.Conv2D}
    assert not any(v.path.split("/")[1].startswith("lora") for v in plain.weights if "/" in v.path)
    vgg16 = build_model(
        ModelSpec(image_size=32, num_classes=3, head_units=config.head_units, head_norm=config.head_norm), None
    )
    assert count_parameters(plain)["total"] == count_parameters(vgg16)["total"]  # no adapter left
    images = splits.test[0]
    trained_p = result.model.predict(images, verbose=0)
    np.testing.assert_allclose(plain.predict(images, verbose=0), trained_p, rtol=0, atol=MERGE_TOLERANCE[name])
    plain.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), trained_p, rtol=0, atol=MERGE_TOLERANCE[name])


def test_the_lora_merge_is_float32_under_mixed_precision(hed):
    """Under a bfloat16 compute policy Keras's merged `kernel` is cast to bfloat16; the merge for
    serving and the drift use the float32 variables: kernel + (alpha / rank) A @ B, computed here in
    float64."""
    spec = dataclasses.replace(spec_of(STUDY["lora_r4"]), head_units=0)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_model(spec, hed.arrays)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    layer = model.get_layer("block3_conv2")
    rng = np.random.default_rng(0)
    layer.lora_kernel_b.assign(rng.normal(0, 0.01, layer.lora_kernel_b.shape).astype("float32"))
    assert layer.kernel.dtype == "bfloat16"  # what the layer computes with, and what this test guards against
    kernel, bias = effective_conv_weights(layer)
    a = np.asarray(layer.lora_kernel_a, np.float64)
    delta = (a.reshape(-1, 4) @ np.asarray(layer.lora_kernel_b, np.float64)).reshape((*a.shape[:3], -1))
    assert kernel.dtype == np.float32 and bias.dtype == np.float32
    np.testing.assert_allclose(kernel, hed.arrays["block3_conv2"][0] + delta, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(bias, hed.arrays["block3_conv2"][1])


def test_bias_only_and_scale_shift_cost_no_kernel_gradient_and_lora_a_full_one():
    layout = cost.Layout(image_size=32, pooling="flatten", num_classes=10, val_images=0, test_images=0)
    layers = cost.layer_flops(layout, head_units=0)
    forward = sum(f for _, f in layers)
    conv = [f for name, f in layers if name.startswith("block")]
    head = layers[-1][1]
    every = frozenset(CONV_LAYERS)
    # every layer: forward + weight gradient; every layer above block1_conv1: input gradient too
    full = cost.step_flops(layers, None, every, "all")[0]
    assert full == pytest.approx(forward + sum(conv) + head + (forward - conv[0]))
    assert cost.step_flops(layers, None, every, "lora")[0] == full
    for kind in ("bias", "scale_shift"):
        assert cost.step_flops(layers, None, every, kind)[0] == pytest.approx(forward + head + forward - conv[0])


def test_a_strategys_parameter_kind_reaches_its_flop_account():
    """The cost of a run (every tune trial and seed) follows the kind: bias-only costs less than
    the same layers with every parameter, LoRA the same."""
    layout = cost.Layout(image_size=32, pooling="flatten", num_classes=10, val_images=20, test_images=20)
    run = {"head_units": 0, "epochs_run": 3, "train_images": 30, "training_path": "end-to-end", "cut_after": None}
    trials = [{"head_units": 0, "epochs_run": 2}]
    every = frozenset(CONV_LAYERS)
    total = {kind: cost.strategy_flops([run], trials, every, layout, kind)["total"] for kind in ("all", "bias", "lora")}
    assert total["bias"] < total["all"] == total["lora"]


def test_the_study_strategy_is_selected_as_the_only_strategy():
    params = load_params()
    assert not params.studies.robustness.enabled and params.studies.parameter_efficient.robustness
    selected, name = params.select(study="lora_r4")
    assert name == "lora_r4" and list(selected.variants) == ["lora_r4"]
    assert selected.report.baseline == "lora_r4" and selected.studies.parameter_efficient.run == ()
    config = RunConfig.from_params(selected, name, head_units=0, learning_rate=1e-3, num_classes=10, seed=1)
    assert (config.parameters, config.lora_rank, config.trainable_layers) == ("lora", 4, frozenset(CONV_LAYERS))
    assert selected.trains_end_to_end(name) and selected.halving_epoch(name) == params.tune.halving_epoch
    with pytest.raises(ConfigError, match="has no strategy 'lora_r5'"):
        params.select(study="lora_r5")
    with pytest.raises(ConfigError, match="applies to --depth only"):
        params.select(variant="frozen", cut="block3")


@pytest.mark.parametrize(
    ("strategy", "key", "message"),
    [
        ({"trainable": "all", "parameters": "weights"}, "parameters", "use one of all, bias, lora, scale_shift"),
        ({"trainable": "none", "parameters": "bias"}, "parameters", "trains none"),
        ({"trainable": "all", "parameters": "lora"}, "lora_rank", "needs a rank >= 1"),
        ({"trainable": "all", "parameters": "bias", "lora_rank": 4}, "lora_rank", "parameters: lora only"),
        ({"trainable": "all", "parameters": "lora", "lora_rank": 32}, "lora_rank", "block1_conv1's kernel has rank"),
        ({"trainable": ["block2"], "parameters": "lora", "lora_rank": 32}, None, None),  # 9 x 64 inputs: fine
    ],
)
def test_impossible_parameter_kinds_name_the_key(write_params, strategy, key, message):
    path = write_params(
        {"variants": {"frozen": {"trainable": "none"}, "odd": strategy}, "report": {"baseline": "frozen"}}
    )
    if key is None:
        assert load_params(path).variants["odd"].lora_rank == 32
        return
    with pytest.raises(ConfigError, match=message) as error:
        load_params(path)
    assert error.value.key == f"variants.odd.{key}"


def test_the_study_refuses_unknown_and_clashing_names(write_params):
    with pytest.raises(ConfigError, match="not in `strategies`") as error:
        load_params(write_params({"studies": {"parameter_efficient": {"run": ["bias_only", "dora"]}}}))
    assert error.value.key == "studies.parameter_efficient.run"
    clash = {"studies": {"parameter_efficient": {"run": ["frozen"], "strategies": {"frozen": {"trainable": "none"}}}}}
    with pytest.raises(ConfigError, match="'frozen' is also a main strategy") as error:
        load_params(write_params(clash))
    assert error.value.key == "studies.parameter_efficient.run"
    clash["studies"]["parameter_efficient"]["run"] = []  # defined but not run: no clash in any table
    assert "frozen" in load_params(write_params(clash)).studies.parameter_efficient.strategies
