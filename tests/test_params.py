"""params.yaml validation: the defaults load, and every bad value names its key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from pipeline.core.params import load_params, parse_params
from pipeline.core.vgg16 import BLOCKS, CONV_LAYERS, resolve_trainable
from pipeline.runtime.errors import ConfigError
from tests import param_reads
from tests.conftest import REPO, merge


def test_repository_params_load_into_frozen_dataclasses():
    params = load_params(REPO / "params.yaml")
    assert params.data.image_size >= 32
    assert set(params.variants) >= {"scratch", "frozen", "last_layers", "partial", "full"}
    assert params.variant_weights("scratch") == "none"
    assert params.variant_weights("frozen") == params.model.weights
    assert isinstance(params.train.seeds, tuple)
    with pytest.raises(AttributeError):
        params.train.max_epochs = 3  # frozen


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ({"data": {"image_sise": 32}}, "data.image_sise", "did you mean 'data.image_size'"),
        ({"trian": {}}, "trian", "did you mean 'train'"),
        ({"data": {"image_size": 16}}, "data.image_size", "below VGG16's minimum of 32"),
        ({"data": {"image_size": "big"}}, "data.image_size", "expected int"),
        ({"data": {"image_size": 32.5}}, "data.image_size", "expected int"),
        ({"data": {"skip_unreadable": 1}}, "data.skip_unreadable", "expected bool"),
        ({"data": {"source": "cifar"}}, "data.source", "fashion_mnist"),
        ({"data": {"source": "directory", "directory": None}}, "data.directory", "is required"),
        ({"data": {"train_per_class": 0}}, "data.train_per_class", "at least 1"),
        ({"train": {"max_epochs": 0}}, "train.max_epochs", "at least 1"),
        ({"train": {"max_epochs": True}}, "train.max_epochs", "expected int"),
        ({"train": {"learning_rate": -1.0}}, "train.learning_rate", "> 0"),
        ({"train": {"seeds": [1, 1, 2]}}, "train.seeds", "repeated: [1]"),
        ({"train": {"seeds": []}}, "train.seeds", "at least one seed"),
        ({"model": {"head_units": -8}}, "model.head_units", ">= 0"),
        ({"model": {"pooling": "max"}}, "model.pooling", "flatten"),
        ({"model": {"weights": "resnet"}}, "model.weights", "hed, imagenet, none"),
        ({"model": {"dropout": 1.0}}, "model.dropout", "[0, 1)"),
        (
            {"variants": {"partial": {"trainable": ["block6"]}}},
            "variants.partial.trainable",
            "'block6' is not a VGG16 block or layer; valid: block1",
        ),
        ({"variants": {"partial": {"trainable": "some"}}}, "variants.partial.trainable", "'all', 'none'"),
        ({"variants": {"partial": {"trainable": "all", "lr": 1}}}, "variants.partial.lr", "unknown key"),
        ({"variants": {"frozen": {"weights": "vgg.bin", "trainable": "none"}}}, "variants.frozen.weights", ".h5"),
        ({"train": {"max_epochs": "five"}}, "train.max_epochs", "expected int, got 'five'"),
        ({"report": {"margin": -0.01}}, "report.margin", "in [0, 0.5)"),
        ({"variants": {"data_conversions": {"trainable": "none"}}}, "variants.data_conversions", "reserved name"),
        (
            {"variants": {"frozen_linear_probe": {"trainable": "none"}}},
            "variants.frozen_linear_probe",
            "a baseline",
        ),
        ({"train": {"max_epochs": -3}}, "train.max_epochs", "at least 1"),
        ({"train": {"learning_rate": 0.0}}, "train.learning_rate", "> 0"),
        ({"tune": {"learning_rate": [3.0e-3, 1.0e-5]}}, "tune.learning_rate", "need 0 < low < high"),
        ({"tune": {"head_units": [-1, 64]}}, "tune.head_units", "choices must be >= 0"),
        (
            {"variants": {"partial": {"trainable": ["block5_conv4"]}}},
            "variants.partial.trainable",
            "'block5_conv4' is not a VGG16 block or layer",
        ),
        (
            {"variants": {"partial": {"warmup_epochs": 5}}, "train": {"max_epochs": 3}},
            "variants.partial.warmup_epochs",
            "leaves no fine-tuning epoch within train.max_epochs=3; lower it below 3",
        ),
        (
            {"tune": {"halving_epoch": 3}, "train": {"max_epochs": 3}},
            "tune.halving_epoch",
            "3 is not below train.max_epochs=3",
        ),
        ({"tune": {"halving_factor": 1}}, "tune.halving_factor", "at least 2"),
        ({"tune": {"learning_rate_head_only": [1e-2, 1e-3]}}, "tune.learning_rate_head_only", "need 0 < low < high"),
        ({"tune": {"head_only_reference_features": -1}}, "tune.head_only_reference_features", "must be >= 0"),
        ({"tune": {"n_trials_end_to_end": 3}}, "tune.n_trials_end_to_end", "unknown key"),
        (
            {"variants": {"frozen": {"warmup_epochs": 1}}},
            "variants.frozen.warmup_epochs",
            "needs a strategy that trains conv layers",
        ),
        (
            {"variants": {"last_layers": {"lr_multipliers": {"block4": 0.1}}}},
            "variants.last_layers.lr_multipliers.block4",
            "block4 does not train in this strategy",
        ),
        (
            {"variants": {"full": {"lr_multipliers": {"head": 2.0}}}},
            "variants.full.lr_multipliers.head",
            "use a block name: block1",
        ),
        ({"studies": {"depth": {"k": [0, 14]}}}, "studies.depth.k", "every k must be in 0..13"),
        (
            {"studies": {"sample_efficiency": {"train_per_class": [10, 10]}}},
            "studies.sample_efficiency.train_per_class",
            "sizes must be unique (repeated: [10])",
        ),
        (
            {"studies": {"parameter_efficient": {"run": ["bias_only", "lora_r4", "bias_only"]}}},
            "studies.parameter_efficient.run",
            "names must be unique (repeated: ['bias_only'])",
        ),
        ({"studies": {"depth": {"k": [2, 4, 2]}}}, "studies.depth.k", "values must be unique (repeated: [2])"),
        ({"tune": {"head_units": [64, 64]}}, "tune.head_units", "choices must be unique (repeated: [64])"),
        (
            {"studies": {"robustness": {"corruptions": ["fog"]}}},
            "studies.robustness.corruptions",
            "use some of gaussian_noise, blur, contrast",
        ),
    ],
)
def test_bad_values_are_rejected_naming_the_key(default_raw_params, override, key, fragment):
    with pytest.raises(ConfigError) as caught:
        parse_params(merge(default_raw_params, override))
    assert caught.value.key == key
    assert fragment in str(caught.value)
    assert str(caught.value).startswith(f"{key}: ")


def test_a_storage_url_with_a_password_is_refused_without_repeating_the_password(default_raw_params):
    raw = merge(default_raw_params, {"tune": {"storage": "postgresql://optuna:hunter2@db-host/optuna"}})
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    message = str(caught.value)
    assert message.startswith("tune.storage: 'postgresql://optuna:***@db-host/optuna'")
    assert "the URL holds a password" in message and "PGPASSWORD" in message and "hunter2" not in message


def test_empty_variants_rejected(default_raw_params):
    raw = dict(default_raw_params, variants={})
    with pytest.raises(ConfigError, match=r"^variants: is empty"):
        parse_params(raw)


def test_missing_key_is_named(default_raw_params):
    raw = merge(default_raw_params, {})
    del raw["train"]["max_epochs"]
    with pytest.raises(ConfigError, match=r"^train\.max_epochs: is missing"):
        parse_params(raw)


def test_yaml_1_1_exponent_string_is_read_as_float(default_raw_params):
    # PyYAML reads `1e-4` (no dot) as the string "1e-4"; the loader accepts it as a float
    params = parse_params(merge(default_raw_params, {"train": {"learning_rate": "1e-4"}}))
    assert params.train.learning_rate == pytest.approx(1e-4)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_trainable_spec_resolves_blocks_and_layers():
    assert resolve_trainable("none") == frozenset()
    assert resolve_trainable("all") == frozenset(CONV_LAYERS)
    assert len(CONV_LAYERS) == 13
    assert resolve_trainable(["block5"]) == frozenset(BLOCKS["block5"])
    assert resolve_trainable(["block4_conv3", "block5"]) == {"block4_conv3", *BLOCKS["block5"]}


def test_every_default_in_the_code_equals_params_yaml():
    """params.yaml is the one place a default lives: a dataclass default that a key of params.yaml
    also sets must equal it (else deleting the key would silently change the run)."""
    import dataclasses
    import typing

    import yaml

    from pipeline.core.params import Params, _convert

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    checked = []

    def walk(cls, mapping, prefix):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            key, value = f"{prefix}{field.name}", mapping.get(field.name, dataclasses.MISSING)
            if dataclasses.is_dataclass(hints[field.name]) and isinstance(value, dict):
                walk(hints[field.name], value, f"{key}.")
            elif value is not dataclasses.MISSING and field.default is not dataclasses.MISSING:
                assert field.default == _convert(hints[field.name], value, key), f"{key}: code {field.default!r}"
                checked.append(key)

    walk(Params, raw, "")
    assert "studies.robustness.enabled" in checked and "data.skip_unreadable" in checked


RECORDED_READS = """
from pipeline.core.params import load_params
params = load_params("params.yaml")
params.trains_end_to_end("frozen")
sorted(params.variants)
exec("params.mlflow.experiment, list(params.variants)", {"__name__": "pipeline.stack.tracking", "params": params})
depth, name = params.with_depth(2)
depth.report.baseline, depth.report.target_accuracy, depth.variants[name].trainable
"""


def test_a_process_records_each_params_value_it_reads_except_through_an_observer(tmp_path):
    """tests/param_reads.py, the evidence for dvc.yaml's `params:` lists: values by full key,
    the strategies' mapping when iterated, nothing read by an observing module (`tracking`) or
    set by the code (the depth study's baseline and strategy)."""
    env = param_reads.environment(tmp_path)
    run = subprocess.run([sys.executable, "-c", RECORDED_READS], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    [record] = [json.loads(path.read_text()) for path in tmp_path.glob("*.json")]
    assert record["reads"] == [
        "model.weights",  # frozen has no weights of its own
        "report.target_accuracy",
        "studies.depth.weights",
        "train.augmentation",
        "train.cache_features",
        "variants",
        "variants.frozen.cut_after",
        "variants.frozen.trainable",
        "variants.frozen.weights",
    ]


def test_only_strategies_that_train_end_to_end_halve_their_tuning():
    params = load_params(REPO / "params.yaml")
    rung = params.tune.halving_epoch
    assert rung > 0
    assert {v: params.halving_epoch(v) for v in ("scratch", "frozen", "last_layers", "partial", "full")} == {
        "scratch": rung,
        "frozen": 0,
        "last_layers": 0,
        "partial": 0,
        "full": rung,
    }
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    uncached = parse_params(merge(raw, {"train": {"cache_features": False}}))
    assert uncached.halving_epoch("frozen") == rung
