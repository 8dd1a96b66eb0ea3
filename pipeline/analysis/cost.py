"""Training cost in floating-point operations (FLOPs): a unit that reruns identically.

Measured seconds move 16-28% between identical runs on one machine and more between machines;
the FLOPs a run performed follow from the network, the images and the epochs it actually ran,
so two runs of the same code and data give the same cost to the last digit. Conventions:

- a forward pass of a conv or dense layer costs 2 x its multiply-accumulates; biases,
  activations, pooling, the head's standardisation and the optimizer update are not counted
  (together under 1% of a VGG16 forward pass);
- in the trained part of the network (above the cut of a cached strategy, the whole network
  otherwise) a training image costs one forward pass, plus one more per layer for the gradient
  of its weights when the layer trains, plus one more for the gradient of its input when a layer
  below it in that part trains (what a gradient tape computes; nothing flows below the lowest
  trainable layer). Which parameters train matters for the weights' gradient only: bias-only and
  scale-and-shift layers need no kernel gradient (their per-channel sums are not counted, like
  biases), while a LoRA layer costs a full one: Keras convolves with the merged kernel and its
  tape computes that kernel's gradient before projecting it onto the low-rank factors;
- every epoch also runs one forward pass of the trained part over the validation images; a
  training run ends with one over the test images;
- a cached strategy computes its frozen prefix once over train, validation and test images,
  shared by every tune trial and seed (counted once per strategy, like its extraction seconds).

Pure functions on plain values; `runs` are seeds' metrics.json, `trials` trials.csv rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pipeline.core.vgg16 import BLOCKS, FILTERS, FULL_BASE, head_features

HEAD_LAYERS = ("head_hidden", "head_output")


@dataclass(frozen=True)
class Layout:
    """What a FLOP count needs beyond the strategy: input size, head type and the split sizes."""

    image_size: int
    pooling: str  # auto | flatten | gap
    num_classes: int
    val_images: int
    test_images: int


def layout_of(data_summary: dict, pooling: str) -> Layout:
    """The Layout of a prepared dataset (its summary.json: image_size, num_classes, totals) and head pooling."""
    totals = data_summary["totals"]
    return Layout(
        image_size=int(data_summary["image_size"]),
        pooling=pooling,
        num_classes=int(data_summary["num_classes"]),
        val_images=int(totals["val"]),
        test_images=int(totals["test"]),
    )


def layer_flops(layout: Layout, head_units: int, cut_after: str = FULL_BASE) -> list[tuple[str, float]]:
    """[(layer name, forward FLOPs per image)] in network order: the conv layers of the base cut
    after block `cut_after` with their poolings (0 FLOPs), and the head's dense layers
    (`head_hidden` only when head_units > 0) on the features the head's pooling gives."""
    layers, size, channels = [], layout.image_size, 3
    for block, convs in BLOCKS.items():
        for name in convs:
            layers.append((name, 2.0 * size * size * 9 * channels * FILTERS[block]))
            channels = FILTERS[block]
        layers.append((f"{block}_pool", 0.0))
        size //= 2  # MaxPooling2D(2, 2), padding "valid": floors odd sizes
        if block == cut_after:
            break
    features = head_features(layout.image_size, cut_after, layout.pooling)
    if head_units:
        layers.append(("head_hidden", 2.0 * features * head_units))
        features = head_units
    layers.append(("head_output", 2.0 * features * layout.num_classes))
    return layers


def cut_of(phase_path: str) -> str | None:
    """The cut layer a training phase ran above ("cached-features (cut after block4_pool)"), or
    None for end-to-end training (fit's `training_path` text, one phase)."""
    match = re.search(r"cut after (\w+)", phase_path)
    return match.group(1) if match else None


def phases(run: dict) -> list[tuple[str | None, bool, int]]:
    """[(cut, head_only, epochs)] of one run: the warm-up phase (head only) when it had one, then
    the main phase, with the epochs each actually ran."""
    paths = run["training_path"].split("; then ")
    warmup = min(int(run.get("warmup_epochs") or 0), int(run["epochs_run"]))
    if len(paths) == 1:
        return [(cut_of(paths[0]), False, int(run["epochs_run"]))]
    return [(cut_of(paths[0]), True, warmup), (cut_of(paths[1]), False, int(run["epochs_run"]) - warmup)]


def _split(layers: list[tuple[str, float]], cut: str | None) -> tuple[list, list]:
    names = [name for name, _ in layers]
    start = 0 if cut is None else names.index(cut) + 1
    return layers[:start], layers[start:]


# the parameter kinds (pipeline/core/vgg16.py PARAMETER_KINDS) whose training computes a kernel gradient
KERNEL_GRADIENT = ("all", "lora")


def step_flops(
    layers: list[tuple[str, float]], cut: str | None, trainable: frozenset[str], parameters: str = "all"
) -> tuple[float, float]:
    """(training FLOPs per image, forward FLOPs per image) of the part above `cut`, with the conv
    layers in `trainable` (their `parameters`) and the head training."""
    _, suffix = _split(layers, cut)
    forward = backward = 0.0
    below_trains = False
    for name, flops in suffix:
        trains = (name in trainable or name in HEAD_LAYERS) and flops > 0
        kernel_gradient = trains and (name in HEAD_LAYERS or parameters in KERNEL_GRADIENT)
        backward += (flops if kernel_gradient else 0.0) + (flops if below_trains else 0.0)
        below_trains = below_trains or trains
        forward += flops
    return forward + backward, forward


def run_flops(
    run: dict, trainable: frozenset[str], layout: Layout, test: bool = True, parameters: str = "all"
) -> float:
    """FLOPs of one training run (a seed, or a tune trial with test=False): every epoch's
    training and validation passes in each phase, then the test pass."""
    # results written before cut points existed have no `cut_after`: they used the whole base
    layers = layer_flops(layout, int(run["head_units"]), run.get("cut_after") or FULL_BASE)
    total = 0.0
    main_cut = None
    for cut, head_only, epochs in phases(run):
        train_step, forward = step_flops(layers, cut, frozenset() if head_only else trainable, parameters)
        total += epochs * (int(run["train_images"]) * train_step + layout.val_images * forward)
        main_cut = cut
    if test:
        total += layout.test_images * step_flops(layers, main_cut, trainable)[1]
    return total


def extraction_flops(runs: list[dict], layout: Layout) -> float:
    """One-time forward passes of every frozen prefix the strategy's runs cached (train,
    validation and test images), each prefix once."""
    cuts = {cut for run in runs for cut, _, _ in phases(run) if cut is not None}
    images = int(runs[0]["train_images"]) + layout.val_images + layout.test_images
    return float(sum(prefix_flops(cut, images, layout) for cut in sorted(cuts)))


def prefix_flops(cut: str, images: int, layout: Layout) -> float:
    """Forward FLOPs of the conv base up to and including `cut` over `images` images."""
    return float(images * sum(f for _, f in _split(layer_flops(layout, 0), cut)[0]))


def strategy_flops(
    runs: list[dict], trials: list[dict], trainable: frozenset[str], layout: Layout, parameters: str = "all"
) -> dict:
    """{"tuning", "training_per_run", "feature_extraction", "total"} in FLOPs: every counted tune
    trial (pruned ones for the epochs they ran), the mean training run over seeds, the one-time
    extraction; total = tuning + one training run + extraction. Trials train on the runs' images
    along the runs' path."""
    template = runs[0]
    tuning = sum(
        run_flops(
            {**template, "head_units": t["head_units"], "epochs_run": t["epochs_run"]},
            trainable,
            layout,
            False,
            parameters,
        )
        for t in trials
    )
    training = float(np.mean([run_flops(run, trainable, layout, True, parameters) for run in runs]))
    extraction = extraction_flops(runs, layout)
    return {
        "tuning": float(tuning),
        "training_per_run": training,
        "feature_extraction": extraction,
        "total": float(tuning) + training + extraction,
    }


def baseline_flops(
    train_images: int, val_images: int, test_images: int, features: int, classes: int, fits: dict
) -> float:
    """FLOPs of a logistic-regression baseline: `fits` = {C: L-BFGS iterations}, each iteration a
    forward and a gradient pass over the training images (2 x 2 x features x classes per image),
    then one prediction pass over validation and test images per fit."""
    per_image = 2.0 * features * classes
    return float(
        sum(
            iterations * train_images * 2 * per_image + (val_images + test_images) * per_image
            for iterations in fits.values()
        )
    )
