"""VGG16's conv-base layout as plain data, and the `trainable` spec that selects from it.

Kept free of TensorFlow so that params validation stays fast; `pipeline.model` builds the
network from these names.
"""

from __future__ import annotations

from pipeline.errors import ConfigError

MIN_IMAGE_SIZE = 32  # keras.applications.VGG16 refuses smaller inputs (five 2x2 poolings)

# block name -> its conv layers, in network order (Keras's own layer names)
BLOCKS: dict[str, tuple[str, ...]] = {
    "block1": ("block1_conv1", "block1_conv2"),
    "block2": ("block2_conv1", "block2_conv2"),
    "block3": ("block3_conv1", "block3_conv2", "block3_conv3"),
    "block4": ("block4_conv1", "block4_conv2", "block4_conv3"),
    "block5": ("block5_conv1", "block5_conv2", "block5_conv3"),
}
FILTERS = {"block1": 64, "block2": 128, "block3": 256, "block4": 512, "block5": 512}
CONV_LAYERS: tuple[str, ...] = tuple(name for layers in BLOCKS.values() for name in layers)


def block_of(layer_name: str) -> str | None:
    """'block4_conv2' -> 'block4'; None for layers outside the conv base (the head)."""
    prefix = layer_name.split("_", 1)[0]
    return prefix if prefix in BLOCKS else None


def resolve_trainable(spec: str | tuple[str, ...] | list[str]) -> frozenset[str]:
    """Turn a `trainable` spec into the set of conv layer names that train.

    `spec` is "all", "none", or a list of block names (block1..block5) and/or conv layer
    names (block5_conv3, ...). Raises ConfigError("trainable", ...) listing the valid names.
    """
    if isinstance(spec, str):
        if spec == "all":
            return frozenset(CONV_LAYERS)
        if spec == "none":
            return frozenset()
        raise ConfigError("trainable", f"{spec!r} is not allowed; use 'all', 'none' or a list of block/layer names")
    selected: set[str] = set()
    for name in spec:
        if name in BLOCKS:
            selected.update(BLOCKS[name])
        elif name in CONV_LAYERS:
            selected.add(name)
        else:
            valid = ", ".join([*BLOCKS, *CONV_LAYERS])
            raise ConfigError("trainable", f"{name!r} is not a VGG16 block or layer; valid: {valid}")
    return frozenset(selected)


def top_layers(k: int) -> frozenset[str]:
    """The top `k` conv layers (0 = none, 13 = the whole base): the freezing-depth sweep's
    strategy "train the top k conv layers"."""
    if not 0 <= k <= len(CONV_LAYERS):
        raise ConfigError("k", f"{k} is not allowed; it must be in 0..{len(CONV_LAYERS)}")
    return frozenset(CONV_LAYERS[len(CONV_LAYERS) - k :])
