"""The model factory: VGG16 preprocessing -> VGG16 conv base -> classification head.

The conv base is `keras.applications.VGG16(include_top=False)`'s architecture with its layer
names (3x3 same-padded ReLU convs, 2x2 max pools; a test proves the outputs identical), laid
out flat in one functional model: `model.get_layer("block5_conv3").output` is a node of this
model, the network can be cut into a frozen prefix and a trainable suffix, and there is no
nested model whose `trainable` flag could silently override its children's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import keras
import numpy as np

from pipeline.core.parameter_kinds import (
    add_adapter,
    conv_layer,
    effective_conv_weights,
    load_conv_weights,
    set_layer_trainable,
)
from pipeline.core.vgg16 import (
    BLOCKS,
    FILTERS,
    FULL_BASE,
    TRAINED_VARIABLES,
    block_of,
    check_cut,
    feature_map,
    head_pool_size,
    kept_layers,
)

HEAD_LAYERS = ("head_dense", "predictions")  # the head layers that own trainable weights


@keras.saving.register_keras_serializable(package="pipeline")
class VGG16Preprocess(keras.layers.Layer):
    """RGB 0-255 -> BGR minus the ImageNet channel means (`vgg16.preprocess_input`), in-model.

    In the model, so every variant (scratch included) and every caller sees the same input
    convention, and it runs exactly once. It has no weights.
    """

    def call(self, images):
        return keras.applications.vgg16.preprocess_input(images)


@dataclass(frozen=True)
class ModelSpec:
    """The network to build, as plain values.

    `image_size`: the square input; `num_classes`; `trainable_layers`: the conv layers that train
    (see `pipeline.core.vgg16.resolve_trainable`); `cut_after`: the block after whose pooling the
    base ends (the blocks above are not built, so they cost nothing and own no parameter; a layer
    above the cut in `trainable_layers` is a ConfigError). The head: `pooling` ("flatten" | "gap" |
    "auto": flatten, average-pooled first where the flat map would exceed
    `vgg16.MAX_HEAD_FEATURES`), `head_units` (0: no hidden layer, the classic tutorial head),
    `dropout`, `augmentation` (random flip/rotation/zoom layers in front of the preprocessing,
    active in training only) and `head_norm` ("standardize": the pooled features centred and
    scaled with statistics set by `set_head_statistics` before training; "none"). `parameters`:
    which parameters of the trainable conv layers train (pipeline/core/parameter_kinds.py), with
    `lora_rank` for "lora".

    The defaults are the smallest head (Flatten -> Dense(classes), nothing else), for callers that
    use only the conv base (feature extraction, benchmarks); a run's head comes from params.yaml
    (`RunConfig.model_spec`).
    """

    image_size: int
    num_classes: int
    trainable_layers: frozenset[str] = frozenset()
    cut_after: str = FULL_BASE
    pooling: str = "flatten"
    head_units: int = 0
    dropout: float = 0.0
    augmentation: bool = False
    head_norm: str = "none"
    parameters: str = "all"
    lora_rank: int = 0


def build_model(spec: ModelSpec, base_weights: dict[str, list[np.ndarray]] | None) -> keras.Model:
    """Build (not compile) the classifier `spec` describes, with conv weights by layer name (None:
    random init). Seed with `keras.utils.set_random_seed` first for a reproducible head. Returns a
    functional model taking uint8-range RGB images."""
    check_cut(spec.trainable_layers, spec.cut_after)
    kept = kept_layers(spec.cut_after)
    images = keras.Input((spec.image_size, spec.image_size, 3), name="image")
    x = images
    if spec.augmentation:
        x = keras.layers.RandomFlip("horizontal", name="augment_flip")(x)
        x = keras.layers.RandomRotation(0.05, fill_mode="nearest", name="augment_rotate")(x)
        x = keras.layers.RandomZoom(0.1, fill_mode="nearest", name="augment_zoom")(x)
    x = VGG16Preprocess(name="preprocess")(x)
    for block, conv_layers in BLOCKS.items():
        if conv_layers[0] not in kept:
            break
        for name in conv_layers:
            parameters = spec.parameters if name in spec.trainable_layers else "all"
            x = conv_layer(FILTERS[block], name, parameters)(x)
        x = keras.layers.MaxPooling2D(2, strides=2, name=f"{block}_pool")(x)
    model = keras.Model(images, _head(x, spec), name="vgg16_classifier")
    for name in kept:
        layer = model.get_layer(name)
        if base_weights is not None:
            load_conv_weights(layer, *base_weights[name])
        if name in spec.trainable_layers:
            add_adapter(layer, spec.parameters, spec.lora_rank)
    set_trainable(model, spec.trainable_layers, spec.parameters)
    return model


def merge_for_serving(model: keras.Model, spec: ModelSpec) -> keras.Model:
    """A plain VGG16 classifier (Keras's Conv2D everywhere, nothing trainable beyond the usual
    layers) computing what `model`, built from `spec`, computes: every conv layer's effective
    kernel and bias (LoRA merged, scale-and-shift folded in), every other layer's weights as they
    are. LoRA and bias-only merge exactly; scale-and-shift to float32 rounding (a test states the
    tolerance)."""
    plain = build_model(dataclasses.replace(spec, parameters="all", lora_rank=0, augmentation=False), None)
    for layer in plain.layers:
        source = model.get_layer(layer.name)
        if layer.name in conv_layer_names(plain):
            layer.set_weights(effective_conv_weights(source))
        elif layer.weights:
            layer.set_weights(source.get_weights())
            if isinstance(layer, keras.layers.Normalization):
                layer.finalize_state()  # it computes with tensors made from its weights here, not the weights
    return plain


def _head(x, spec: ModelSpec):
    """The classification head on the base's last feature map `x`: its output (probabilities)."""
    if spec.pooling == "gap":
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    else:
        window = head_pool_size(*feature_map(spec.image_size, spec.cut_after), spec.pooling)
        if window > 1:  # `auto` on a map too large to flatten: the finest average-pooled grid that fits
            x = keras.layers.AveragePooling2D(window, strides=window, padding="same", name="head_pool")(x)
        x = keras.layers.Flatten(name="flatten")(x)
    if spec.head_norm == "standardize":
        # Pretrained ReLU features are far from unit scale (hed block5_pool at 32x32: 0..160, 36%
        # zeros): a Glorot head on them starts at a loss of 6-12 instead of ln(classes) and Adam
        # spends its epochs undoing that. Standardised features start near ln(classes) for any base.
        # Fixed statistics, not BatchNormalization: its moving averages need hundreds of steps to
        # settle, so on small data validation (inference mode) would see unnormalised features.
        x = keras.layers.Normalization(axis=-1, name="head_norm")(x)
    if spec.head_units:
        x = keras.layers.Dense(spec.head_units, activation="relu", name="head_dense")(x)
        x = keras.layers.Dropout(spec.dropout, name="head_dropout")(x)
    # float32 softmax also under a mixed-precision policy (bfloat16 probabilities are too coarse)
    return keras.layers.Dense(spec.num_classes, activation="softmax", name="predictions", dtype="float32")(x)


def conv_layer_names(model: keras.Model) -> tuple[str, ...]:
    """The conv layers a (possibly cut) model has, in network order."""
    return tuple(layer.name for layer in model.layers if block_of(layer.name) and "_conv" in layer.name)


def set_head_statistics(model: keras.Model, head_inputs: np.ndarray) -> None:
    """Set the `head_norm` layer (if the model has one) from `head_inputs` (the pooled features of
    the training images, N x D): subtract each dimension's mean, divide by one global standard
    deviation (the root of the mean per-dimension variance). A data-dependent initialisation,
    fixed during training.

    One global scale, not one per dimension: it keeps the features' relative scale (a probe on
    per-dimension standardised hed features is less accurate, 0.67 vs 0.69), and a dimension that
    is nearly constant at initialisation is not blown up when the base trains and it starts moving.
    """
    if "head_norm" not in [layer.name for layer in model.layers]:
        return
    values = np.asarray(head_inputs, dtype=np.float64)
    variance = np.full(values.shape[1], values.var(axis=0).mean())
    layer = model.get_layer("head_norm")
    layer.set_weights([values.mean(axis=0), variance, np.array(len(values))])
    layer.finalize_state()  # Normalization reads its statistics from tensors made here


def set_trainable(model: keras.Model, trainable_layers: frozenset[str], parameters: str = "all") -> None:
    """Exactly `trainable_layers` of the conv base train, and of them only the variables of
    `parameters` (the head always trains); compile again after."""
    for name in conv_layer_names(model):
        set_layer_trainable(model.get_layer(name), name in trainable_layers, parameters)


@keras.saving.register_keras_serializable(package="pipeline")
class BlockwiseAdam(keras.optimizers.Adam):
    """Adam whose step size is `learning_rate x multipliers[block]` for the weights of a VGG16
    block (discriminative learning rates); the head and unlisted blocks use the plain rate.

    Adam is invariant to gradient scale, so the rate itself must be scaled, per variable.
    """

    def __init__(self, multipliers: dict[str, float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.multipliers = dict(multipliers or {})
        self._factors: list[float] = []

    def build(self, var_list):
        super().build(var_list)
        self._factors = [self.multipliers.get(block_of(v.path.split("/")[0]), 1.0) for v in var_list]

    def update_step(self, gradient, variable, learning_rate):
        factor = self._factors[self._get_variable_index(variable)]
        if factor != 1.0:
            learning_rate = learning_rate * factor
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "multipliers": self.multipliers}


def compile_model(
    model: keras.Model,
    learning_rate: float,
    trainable_layers: frozenset[str],
    jit_compile: bool = False,
    multipliers: dict[str, float] | None = None,
    parameters: str = "all",
) -> None:
    """Compile with Adam (block-wise learning-rate `multipliers` when given) + sparse categorical
    cross-entropy, then check that exactly `trainable_layers` (their `parameters`) plus the head
    train (RuntimeError otherwise).

    Recompile after any change to `trainable`: Keras reads the flags at compile time.
    """
    optimizer = (
        BlockwiseAdam(multipliers, learning_rate=learning_rate)
        if multipliers
        else keras.optimizers.Adam(learning_rate=learning_rate)
    )
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    check_trainable(model, trainable_layers, parameters)


def trainable_layer_names(model: keras.Model) -> frozenset[str]:
    """Names of the layers owning at least one trainable weight (from `trainable_weights`)."""
    return frozenset(variable.path.split("/")[0] for variable in model.trainable_weights)


def check_trainable(model: keras.Model, trainable_layers: frozenset[str], parameters: str = "all") -> None:
    """Raise RuntimeError unless exactly the spec's conv layers plus the head train, and of the conv
    layers exactly the variables `parameters` names."""
    head = {layer.name for layer in model.layers if layer.name in HEAD_LAYERS}
    expected = frozenset(trainable_layers) | head
    actual = trainable_layer_names(model)
    if actual != expected:
        raise RuntimeError(
            f"trainable layers differ from the spec: unexpected {sorted(actual - expected)}, "
            f"missing {sorted(expected - actual)}"
        )
    variables = {v.path for v in model.trainable_weights if block_of(v.path.split("/")[0])}
    wanted = {f"{layer}/{name}" for layer in trainable_layers for name in TRAINED_VARIABLES[parameters]}
    if variables != wanted:
        raise RuntimeError(
            f"trainable conv variables differ from parameters: {parameters}: unexpected {sorted(variables - wanted)}, "
            f"missing {sorted(wanted - variables)}"
        )


def _size(variables) -> int:
    return sum(math.prod(v.shape) for v in variables)


def count_parameters(model: keras.Model) -> dict:
    """Parameter counts from `trainable_weights` / `non_trainable_weights` (not `summary()`,
    which adds optimizer variables once the optimizer is built).

    Returns {"total", "trainable", "non_trainable", "per_block": {block1..block5, head:
    {"trainable", "non_trainable"}}}.
    """
    per_block = {name: {"trainable": 0, "non_trainable": 0} for name in [*BLOCKS, "head"]}
    for kind, variables in (("trainable", model.trainable_weights), ("non_trainable", model.non_trainable_weights)):
        for variable in variables:
            block = block_of(variable.path.split("/")[0]) or "head"
            per_block[block][kind] += math.prod(variable.shape)
    trainable = _size(model.trainable_weights)
    non_trainable = _size(model.non_trainable_weights)
    return {
        "total": trainable + non_trainable,
        "trainable": trainable,
        "non_trainable": non_trainable,
        "per_block": per_block,
    }
