"""Which parameters of a trainable conv layer train: `parameters` (all, bias, lora, scale_shift).

Freezing picks layers; these pick parameters inside the layers that train (pipeline/core/vgg16.py
TRAINED_VARIABLES names them). `all` and `bias` use Keras's own Conv2D; `lora` adds Keras's
low-rank update (`Conv2D.enable_lora`); `scale_shift` uses `ScaleShiftConv2D` below. Every kind
has an *effective* kernel and bias, what the layer computes with: a plain Conv2D with them gives
the same outputs (`effective_conv_weights`, used for serving and for weight drift).

A trap this module exists for: in Keras 3, setting `layer.trainable` sets the `trainable` flag of
every variable of the layer, so variable-level freezing must be applied after it, every time
(`set_layer_trainable`).
"""

from __future__ import annotations

import keras
import numpy as np

from pipeline.core.vgg16 import TRAINED_VARIABLES


@keras.saving.register_keras_serializable(package="pipeline")
class ScaleShiftConv2D(keras.layers.Conv2D):
    """A Conv2D whose output gets a per-channel scale and shift before its activation:
    activation(scale * (conv(x, kernel) + bias) + shift), with scale = 1 and shift = 0 at
    initialisation (the pretrained layer's output, unchanged). Merges exactly, up to rounding, into
    a Conv2D with kernel x scale and bias x scale + shift."""

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(self.filters,), initializer="ones")
        self.shift = self.add_weight(name="shift", shape=(self.filters,), initializer="zeros")
        super().build(input_shape)

    def call(self, inputs):
        outputs = self.convolution_op(inputs, self.kernel) + self.bias
        outputs = outputs * self.scale + self.shift
        return self.activation(outputs) if self.activation is not None else outputs


def conv_layer(filters: int, name: str, parameters: str) -> keras.layers.Conv2D:
    """VGG16's 3x3 same-padded ReLU conv; a ScaleShiftConv2D when it trains `scale_shift`."""
    cls = ScaleShiftConv2D if parameters == "scale_shift" else keras.layers.Conv2D
    return cls(filters, 3, padding="same", activation="relu", name=name)


def load_conv_weights(layer: keras.layers.Conv2D, kernel: np.ndarray, bias: np.ndarray) -> None:
    """Set a conv layer's kernel and bias (a ScaleShiftConv2D keeps its scale and shift)."""
    layer._kernel.assign(kernel)  # `kernel` is a read-only property on a LoRA layer: the variable itself
    layer.bias.assign(bias)


def add_adapter(layer: keras.layers.Conv2D, parameters: str, lora_rank: int) -> None:
    """Give a built conv layer the variables its kind trains beyond its own (LoRA's A and B; rank
    `lora_rank`, A He-uniform, B zeros, so the update starts at 0). Call once, after its weights
    are loaded."""
    if parameters == "lora":
        layer.enable_lora(lora_rank)


def set_layer_trainable(layer: keras.layers.Layer, trains: bool, parameters: str) -> None:
    """Freeze or unfreeze a conv layer; when it trains, only the variables of `parameters` do."""
    layer.trainable = trains  # Keras 3 sets every variable's flag to this value: re-freeze after it
    if trains:
        for variable in layer.weights:
            variable.trainable = variable.name in TRAINED_VARIABLES[parameters]


def effective_conv_weights(layer: keras.layers.Conv2D) -> list[np.ndarray]:
    """[kernel, bias] that a plain Conv2D needs to compute what `layer` computes, in the float32
    of its variables: for LoRA the merged kernel, kernel + (alpha / rank) A @ B (Keras's `kernel`
    property computes the same but casts it to the compute dtype, bfloat16 under mixed precision),
    for scale-and-shift kernel x scale and bias x scale + shift; the layer's own weights otherwise."""
    kernel = layer._kernel  # the variable; `kernel` is the merged one, cast, on a LoRA layer
    if layer.lora_enabled:
        update = keras.ops.matmul(layer.lora_kernel_a, layer.lora_kernel_b)
        kernel = keras.ops.add(kernel, (layer.lora_alpha / layer.lora_rank) * update)
    kernel, bias = np.asarray(kernel), np.asarray(layer.bias)
    if isinstance(layer, ScaleShiftConv2D):
        scale, shift = np.asarray(layer.scale), np.asarray(layer.shift)
        return [kernel * scale, bias * scale + shift]
    return [kernel, bias]
