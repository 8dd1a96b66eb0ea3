"""The terminal's view of a training run: one line per epoch instead of Keras's progress bars.
An observer: it prints, and changes nothing a run computes."""

from __future__ import annotations

import keras


class ProgressLine(keras.callbacks.Callback):
    """One terminal line per epoch instead of Keras's progress bars: the run, the epoch, train and
    validation loss and accuracy, the epoch's seconds and an upper bound on the time left (every
    remaining epoch up to max_epochs at the median epoch time; early stopping usually ends sooner)."""

    def __init__(self, run_name: str, max_epochs: int):
        super().__init__()
        self.run_name, self.max_epochs, self.seconds = run_name, max_epochs, []

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.seconds.append(float(logs.get("epoch_seconds", 0.0)))  # the training function's clock
        left = (self.max_epochs - epoch - 1) * sorted(self.seconds)[len(self.seconds) // 2]
        values = ", ".join(
            f"{label} {logs[key]:.4f}"
            for key, label in (
                ("loss", "loss"),
                ("accuracy", "acc"),
                ("val_loss", "val_loss"),
                ("val_accuracy", "val_acc"),
            )
            if key in logs
        )
        print(
            f"[{self.run_name}] epoch {epoch + 1}/{self.max_epochs}: {values}, {self.seconds[-1]:.1f}s "
            f"(at most {_duration(left)} left)",
            flush=True,
        )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
