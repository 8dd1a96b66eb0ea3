"""Training cost in FLOPs (pipeline/analysis/cost.py): layer counts by hand, the backward-pass convention,
whole runs and tune trials, and the one-time extraction of a cached prefix."""

import pytest

from pipeline.analysis import cost
from pipeline.core.vgg16 import CONV_LAYERS, resolve_trainable

LAYOUT = cost.Layout(image_size=32, pooling="flatten", num_classes=10, val_images=500, test_images=2000)


def _conv(size, c_in, c_out):
    return 2 * size * size * 9 * c_in * c_out


def test_conv_base_forward_matches_the_published_vgg16_count():
    """At 224x224 the 13 conv layers are 15,346,630,656 multiply-accumulates (the VGG16 figure),
    so 2x that in FLOPs; at 32x32 each layer is counted by hand."""
    at_224 = cost.layer_flops(cost.Layout(224, "flatten", 1000, 0, 0), 0)
    assert sum(f for name, f in at_224 if name in CONV_LAYERS) == 2 * 15_346_630_656
    flops = dict(cost.layer_flops(LAYOUT, 256))
    assert flops["block1_conv1"] == _conv(32, 3, 64) == 3_538_944
    assert flops["block3_conv2"] == _conv(8, 256, 256)
    assert flops["block5_conv3"] == _conv(2, 512, 512) == 18_874_368
    assert flops["block5_pool"] == 0
    assert flops["head_hidden"] == 2 * 512 * 256 and flops["head_output"] == 2 * 256 * 10  # 1x1x512 flattened
    assert "head_hidden" not in dict(cost.layer_flops(LAYOUT, 0))
    gap = dict(cost.layer_flops(cost.Layout(64, "gap", 10, 0, 0), 0))
    assert gap["head_output"] == 2 * 512 * 10  # 2x2x512 averaged to 512


def test_odd_image_sizes_floor_at_every_pooling():
    flops = dict(cost.layer_flops(cost.Layout(40, "flatten", 10, 0, 0), 0))
    assert flops["block4_conv1"] == _conv(5, 256, 512)  # 40 -> 20 -> 10 -> 5
    assert flops["block5_conv1"] == _conv(2, 512, 512)  # 5 -> 2 (floored)
    assert flops["head_output"] == 2 * 512 * 10  # 2 -> 1


def test_backward_pass_counts_weight_gradients_of_what_trains_and_input_gradients_above_it():
    layers = cost.layer_flops(LAYOUT, 0)
    f = dict(layers)
    head = f["head_output"]
    # frozen: head only above block5_pool: forward + its weight gradient, no input gradient
    assert cost.step_flops(layers, "block5_pool", frozenset()) == (2 * head, head)
    # last_layers: block5_conv3 trains above block5_conv2; the head also needs its input gradient
    step, forward = cost.step_flops(layers, "block5_conv2", resolve_trainable(["block5_conv3"]))
    assert forward == f["block5_conv3"] + head
    assert step == forward + f["block5_conv3"] + 2 * head
    # full, end to end: every layer twice more except block1_conv1's input gradient (the image)
    step, forward = cost.step_flops(layers, None, resolve_trainable("all"))
    assert forward == sum(f.values())
    assert step == 3 * forward - f["block1_conv1"]


def _run(**overrides):
    run = {
        "epochs_run": 10,
        "warmup_epochs": 0,
        "training_path": "end-to-end",
        "head_units": 0,
        "train_images": 500,
    }
    return {**run, **overrides}


def test_a_run_costs_its_epochs_of_training_and_validation_then_one_test_pass():
    layers = cost.layer_flops(LAYOUT, 0)
    trainable = resolve_trainable("all")
    step, forward = cost.step_flops(layers, None, trainable)
    expected = 10 * (500 * step + 500 * forward) + 2000 * forward
    assert cost.run_flops(_run(), trainable, LAYOUT) == expected
    assert cost.run_flops(_run(), trainable, LAYOUT, test=False) == expected - 2000 * forward


def test_warmup_epochs_are_counted_as_head_only_on_their_own_path():
    layers = cost.layer_flops(LAYOUT, 0)
    trainable = resolve_trainable(["block5"])
    run = _run(
        epochs_run=12,
        warmup_epochs=4,
        training_path="warm-up cached-features (cut after block5_pool); then cached-features (cut after block4_pool)",
    )
    head_step, head_forward = cost.step_flops(layers, "block5_pool", frozenset())
    step, forward = cost.step_flops(layers, "block4_pool", trainable)
    expected = 4 * (500 * head_step + 500 * head_forward) + 8 * (500 * step + 500 * forward) + 2000 * forward
    assert cost.run_flops(run, trainable, LAYOUT) == pytest.approx(expected)
    both = cost.extraction_flops([run], LAYOUT)
    assert both == cost.prefix_flops("block5_pool", 3000, LAYOUT) + cost.prefix_flops("block4_pool", 3000, LAYOUT)


def test_strategy_cost_adds_every_trial_one_mean_run_and_the_extraction_once():
    trainable = frozenset()
    cached = "cached-features (cut after block5_pool)"
    runs = [_run(training_path=cached, epochs_run=e, head_units=256) for e in (20, 30)]
    trials = [{"head_units": 0, "epochs_run": 4}, {"head_units": 256, "epochs_run": 25}]
    parts = cost.strategy_flops(runs, trials, trainable, LAYOUT)
    trial_flops = sum(
        cost.run_flops(
            _run(training_path=cached, head_units=t["head_units"], epochs_run=t["epochs_run"]),
            trainable,
            LAYOUT,
            test=False,
        )
        for t in trials
    )
    assert parts["tuning"] == trial_flops
    assert parts["training_per_run"] == pytest.approx(
        cost.run_flops(runs[0], trainable, LAYOUT) / 2 + cost.run_flops(runs[1], trainable, LAYOUT) / 2
    )
    assert parts["feature_extraction"] == cost.prefix_flops("block5_pool", 3000, LAYOUT)
    assert parts["total"] == parts["tuning"] + parts["training_per_run"] + parts["feature_extraction"]
    assert cost.strategy_flops(runs, [], trainable, LAYOUT)["tuning"] == 0
    # the base runs once per image for extraction and never again: extraction dwarfs the head's epochs
    assert parts["feature_extraction"] > 10 * parts["training_per_run"]


def test_baseline_cost_counts_lbfgs_iterations_over_the_grid():
    flops = cost.baseline_flops(500, 500, 2000, 3072, 10, {"0.1": 100, "1.0": 200})
    per_image = 2 * 3072 * 10
    assert flops == 300 * 500 * 2 * per_image + 2 * 2500 * per_image


def test_layout_of_reads_the_prepared_summary():
    summary = {
        "image_size": 32,
        "num_classes": 2,
        "totals": {"train": 10, "val": 7, "test": 19},
    }
    assert cost.layout_of(summary, "gap") == cost.Layout(32, "gap", 2, 7, 19)
