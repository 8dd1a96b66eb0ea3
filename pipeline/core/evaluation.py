"""Test-set metrics from predicted class probabilities (scikit-learn)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score


def evaluate(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class recall and the confusion matrix (rows: true, cols: predicted)."""
    predicted = probabilities.argmax(axis=1)
    classes = list(range(len(class_names)))
    recall = recall_score(labels, predicted, labels=classes, average=None, zero_division=0)
    return {
        "test_accuracy": float(accuracy_score(labels, predicted)),
        "test_macro_f1": float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0)),
        "test_recall_per_class": {name: float(r) for name, r in zip(class_names, recall, strict=True)},
        "confusion_matrix": confusion_matrix(labels, predicted, labels=classes).tolist(),
    }


def epochs_to_target(history: list[dict], target: float) -> tuple[int | None, float | None]:
    """(first epoch whose val_accuracy >= target, cumulative seconds then), or (None, None)."""
    for row in history:
        if row["val_accuracy"] >= target:
            return row["epoch"], row["cumulative_seconds"]
    return None, None


def robustness(
    model,
    images: np.ndarray,
    labels: np.ndarray,
    clean_accuracy: float,
    corruptions: tuple[str, ...],
    severity: int,
    seed: int,
    batch_size: int,
) -> dict:
    """Accuracy of `model` (the full network, images in) on corrupted copies of the test set.

    Returns {"severity", "clean_accuracy", "accuracy": {kind: acc}, "drop": {kind: clean - acc},
    "mean_drop"}.
    """
    from pipeline.core.corruptions import corrupt
    from pipeline.core.frozen_features import predict

    accuracy = {}
    for kind in corruptions:
        predicted = predict(model, corrupt(images, kind, severity, seed), batch_size).argmax(axis=1)
        accuracy[kind] = float(accuracy_score(labels, predicted))
    drop = {kind: clean_accuracy - value for kind, value in accuracy.items()}
    return {
        "severity": severity,
        "clean_accuracy": clean_accuracy,
        "accuracy": accuracy,
        "drop": drop,
        "mean_drop": float(np.mean(list(drop.values()))),
    }
