"""Weight drift: how far fine-tuning moved each VGG16 block from where it started.

drift(block) = ||W - W0|| / ||W0||, with W the block's conv kernels and biases flattened
together and W0 their values before the first training step (pretrained weights, or the random
initialisation for scratch). W is what the layers compute with (`effective_conv_weights`): a
LoRA layer's merged kernel, a scale-and-shift layer's folded kernel and bias. A block that never
trained is exactly 0.0, and so is one the model does not have (a base cut below it: nothing of it
exists to move).
"""

from __future__ import annotations

import keras
import numpy as np

from pipeline.core.parameter_kinds import effective_conv_weights
from pipeline.core.vgg16 import BLOCKS


def snapshot(model: keras.Model) -> dict[str, list[np.ndarray]]:
    """Copies of every conv layer's weights, by block (the blocks the model has)."""
    names = {layer.name for layer in model.layers}
    return {
        block: [np.array(w) for name in layers for w in effective_conv_weights(model.get_layer(name))]
        for block, layers in BLOCKS.items()
        if layers[0] in names
    }


def block_drift(model: keras.Model, initial: dict[str, list[np.ndarray]], blocks=tuple(BLOCKS)) -> dict[str, float]:
    """{block: ||W - W0|| / ||W0||} for `blocks` (computed in float64); 0.0 for a block the model
    does not have (absent from `initial`)."""
    out = {}
    for block in blocks:
        if block not in initial:
            out[block] = 0.0
            continue
        current = [w for name in BLOCKS[block] for w in effective_conv_weights(model.get_layer(name))]
        moved = sum(float(np.sum((np.float64(w) - w0) ** 2)) for w, w0 in zip(current, initial[block], strict=True))
        size = sum(float(np.sum(np.float64(w0) ** 2)) for w0 in initial[block])
        out[block] = float(np.sqrt(moved / size)) if size > 0 else float(np.sqrt(moved))
    return out


class DriftRecorder(keras.callbacks.Callback):
    """Adds `drift_<block>` to each epoch's logs (so MLflow and the history get it).

    The initial weights are taken at the first `fit()` it sees and kept across later ones (a
    warm-up phase then fine-tuning share one reference). Per epoch, only blocks in `watched`
    (those the strategy trains) are measured; the others report 0.0, and `block_drift` on the
    final weights measures every block, frozen ones included.
    """

    def __init__(self, full_model: keras.Model, watched: frozenset[str]):
        super().__init__()
        self.full_model = full_model
        self.watched = tuple(block for block in BLOCKS if block in watched)
        self.initial: dict[str, list[np.ndarray]] | None = None

    def on_train_begin(self, logs=None):
        if self.initial is None:
            self.initial = snapshot(self.full_model)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        measured = block_drift(self.full_model, self.initial, self.watched)
        for block in BLOCKS:
            logs[f"drift_{block}"] = measured.get(block, 0.0)
