"""VGG16's conv-base layout as plain data, and the `trainable` spec that selects from it.

Kept free of TensorFlow so that params validation stays fast; `pipeline.core.model` builds the
network from these names.
"""

from __future__ import annotations

from pipeline.runtime.errors import ConfigError

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

# `parameters`: which weights of a trainable conv layer train (README "Beyond layer freezing").
# The layer's own variables (Keras names) that train under each kind:
#   all          kernel and bias (classic fine-tuning)
#   bias         the bias only (BitFit, Ben Zaken et al. 2022): C_out per layer
#   lora         a low-rank update of the kernel, kernel + A @ B with A (3, 3, C_in, r), B (r, C_out)
#                (LoRA, Hu et al. 2022, on convolutions: Keras's `enable_lora`); kernel and bias frozen
#   scale_shift  a per-channel scale and shift after the conv, before its ReLU: 2 x C_out per layer;
#                kernel and bias frozen (norm-only tuning for a network without normalisation layers)
TRAINED_VARIABLES: dict[str, tuple[str, ...]] = {
    "all": ("kernel", "bias"),
    "bias": ("bias",),
    "lora": ("lora_kernel_a", "lora_kernel_b"),
    "scale_shift": ("scale", "shift"),
}
PARAMETER_KINDS: tuple[str, ...] = tuple(TRAINED_VARIABLES)
_KIND_WORDS = {
    "all": "",
    "bias": "biases only",
    "lora": "LoRA rank {rank} on the kernels",
    "scale_shift": "a scale and shift per channel",
}


def kind_words(parameters: str, lora_rank: int = 0) -> str:
    """What of a trainable conv layer trains, in words ("" for `all`: everything), for tables."""
    return _KIND_WORDS[parameters].format(rank=lora_rank)


CUT_POINTS: tuple[str, ...] = tuple(BLOCKS)  # `cut_after`: the base ends after this block's pooling layer
FULL_BASE = "block5"  # no cut: all five blocks
# `model.pooling: auto` flattens the feature map at the cut when that gives at most this many values,
# else average-pools it to the finest grid that fits. 25,088 = block5 flattened at 224x224 (7x7x512),
# the classic tutorial's head: an uncut base keeps it at every size up to 224, and a cut base never
# gives the head more (block3 at 224 would be 200,704). README "Where the network is cut".
MAX_HEAD_FEATURES = 25088


def conv_channels(name: str) -> tuple[int, int]:
    """(input channels, output channels) of conv layer `name` (the first one reads RGB)."""
    index = CONV_LAYERS.index(name)
    previous = 3 if index == 0 else FILTERS[block_of(CONV_LAYERS[index - 1])]
    return previous, FILTERS[block_of(name)]


def max_lora_rank(name: str) -> int:
    """The largest useful LoRA rank of conv layer `name`: min(9 C_in, C_out), the rank of its kernel
    as a (9 C_in) x C_out matrix (27 for block1_conv1)."""
    channels_in, channels_out = conv_channels(name)
    return min(9 * channels_in, channels_out)


def kept_layers(cut_after: str) -> tuple[str, ...]:
    """The conv layers of a base cut after block `cut_after`, in network order."""
    if cut_after not in BLOCKS:
        raise ConfigError("cut_after", f"{cut_after!r} is not a VGG16 block; use one of {', '.join(BLOCKS)}")
    blocks = list(BLOCKS)
    return tuple(name for block in blocks[: blocks.index(cut_after) + 1] for name in BLOCKS[block])


def check_cut(trainable_layers: frozenset[str], cut_after: str) -> None:
    """ConfigError("trainable", ...) when a layer that should train lies above the cut (removed)."""
    removed = sorted(set(trainable_layers) - set(kept_layers(cut_after)), key=CONV_LAYERS.index)
    if removed:
        raise ConfigError(
            "trainable",
            f"{', '.join(removed)} lie above the cut (cut_after: {cut_after}): the base ends after "
            f"{cut_after}_pool, so only {cut_after} and the blocks below it exist and can train; "
            "remove them from `trainable` or cut after a higher block",
        )


def feature_map(image_size: int, cut_after: str) -> tuple[int, int]:
    """(side, channels) of the base's output when cut after `cut_after` (2x2 poolings, floored)."""
    return image_size // 2 ** (CUT_POINTS.index(cut_after) + 1), FILTERS[cut_after]


def head_pool_size(side: int, channels: int, pooling: str, max_features: int = MAX_HEAD_FEATURES) -> int:
    """The average-pooling window (and stride) in front of the head's Flatten: 1 (none) for
    `flatten`, and for `auto` while side x side x channels <= max_features; else the smallest window
    whose grid (ceil(side / window) squared, "same" padding: edge windows average what they cover)
    fits. Not used for `gap`."""
    if pooling != "auto":
        return 1
    window = 1
    while _grid(side, window) ** 2 * channels > max_features and window < side:
        window += 1
    return window


def _grid(side: int, window: int) -> int:
    return -(-side // window)  # ceil: "same" padding keeps the partial windows at the edge


def head_features(image_size: int, cut_after: str, pooling: str, max_features: int = MAX_HEAD_FEATURES) -> int:
    """How many values the head receives: channels for `gap`, else the (pooled) grid x channels."""
    side, channels = feature_map(image_size, cut_after)
    if pooling == "gap":
        return channels
    return _grid(side, head_pool_size(side, channels, pooling, max_features)) ** 2 * channels


def block_of(layer_name: str) -> str | None:
    """'block4_conv2' -> 'block4'; None for layers outside the conv base (the head)."""
    prefix = layer_name.split("_", 1)[0]
    return prefix if prefix in BLOCKS else None


def resolve_trainable(spec: str | tuple[str, ...] | list[str], cut_after: str = FULL_BASE) -> frozenset[str]:
    """Turn a `trainable` spec into the set of conv layer names that train.

    `spec` is "all" (every conv layer the base keeps when cut after `cut_after`), "none", or a
    list of block names (block1..block5) and/or conv layer names (block5_conv3, ...). Raises
    ConfigError("trainable", ...) listing the valid names.
    """
    if isinstance(spec, str):
        if spec == "all":
            return frozenset(kept_layers(cut_after))
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
