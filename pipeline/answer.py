"""The answer to "how much should I freeze?", chosen on validation, read from the stages' files.

The rule (the report and the register stage both use it):
  1. best_on_validation: the strategy with the highest mean best-validation accuracy over its
     seeds (ties: fewer trainable parameters, then the name). Test accuracy plays no part.
  2. indistinguishable_from_best: the strategies whose test accuracy minus the best's has a 95%
     interval (seeds and test images, paired on images; `pipeline.stats.difference_interval`)
     that contains 0.
  3. recommended: among the best and those, the cheapest in measured compute: the seconds its
     tuning trials trained, plus one training run (mean over seeds), plus the one-time feature
     extraction its cached path needs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.evaluation import read_predictions
from pipeline.stats import difference_interval


def read_evidence(train_dir: Path, tune_dir: Path, variant: str) -> dict:
    """One strategy's inputs to the rule: {"val_accuracy", "correct" (seeds x images 0/1),
    "labels", "seeds", "params_trainable", "compute_seconds" and its parts}."""
    seeds_dir = Path(train_dir) / variant / "seeds"
    if not seeds_dir.is_dir():
        raise DataError(f"{seeds_dir} not found; run `dvc repro train@{variant}` first")
    seeds = sorted(int(p.name) for p in seeds_dir.iterdir() if p.is_dir())
    if not seeds:
        raise DataError(f"{seeds_dir} holds no seed results; rerun `dvc repro train@{variant}`")
    metrics = [json.loads((seeds_dir / str(s) / "metrics.json").read_text()) for s in seeds]
    labels, correct = read_correct([seeds_dir / str(s) / "test_predictions.csv" for s in seeds])
    tuning = _tuning_seconds(Path(tune_dir) / variant / "trials.csv")
    training = float(np.mean([m["timing"]["train_seconds"] for m in metrics]))
    extraction = max(m["timing"].get("extraction_seconds", 0.0) for m in metrics)
    return {
        "val_accuracy": float(np.mean([m["best_val_accuracy"] for m in metrics])),
        "correct": correct,
        "labels": labels,
        "seeds": seeds,
        "params_trainable": metrics[0]["parameters"]["trainable"],
        "compute_seconds": tuning + training + extraction,
        "compute_parts": {"tuning": tuning, "training_per_run": training, "feature_extraction": extraction},
    }


def read_correct(prediction_files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, seeds x images 0/1 matrix) from per-seed prediction files of one test set; a
    DataError when the files disagree on the images (a comparison needs the same test set)."""
    predictions = [read_predictions(path) for path in prediction_files]
    labels = predictions[0][0]
    for path, (other, _) in zip(prediction_files, predictions, strict=True):
        if not np.array_equal(other, labels):
            raise DataError(f"{path} holds another test set than {prediction_files[0]}; rerun the stage that wrote it")
    return labels, np.array([predicted == labels for _, predicted in predictions], dtype=np.int8)


def _tuning_seconds(trials_csv: Path) -> float:
    """Training seconds of every counted tune trial (0.0 when the strategy was not tuned)."""
    if not trials_csv.is_file():
        return 0.0
    with trials_csv.open() as f:
        return float(sum(float(row.get("train_seconds") or 0.0) for row in csv.DictReader(f)))


def choose(evidence: dict[str, dict]) -> dict:
    """The answer from {strategy: read_evidence(...)}; see the module docstring for the rule."""
    if not evidence:
        raise DataError("no strategy results to choose from; run the train stages first")
    best = max(evidence, key=lambda v: (evidence[v]["val_accuracy"], -evidence[v]["params_trainable"], v))
    reference = evidence[best]["correct"]
    differences = {v: difference_interval(e["correct"], reference) for v, e in evidence.items() if v != best}
    tied = [v for v, d in differences.items() if d.low <= 0 <= d.high]
    candidates = [best, *tied]
    recommended = min(candidates, key=lambda v: (evidence[v]["compute_seconds"], v))
    cost = {v: evidence[v]["compute_seconds"] for v in evidence}
    return {
        "best_on_validation": best,
        "indistinguishable_from_best": sorted(tied),
        "recommended": recommended,
        "compute_seconds": cost,
        "recommended_cost_ratio": cost[recommended] / cost[best] if cost[best] else 1.0,
        "differences_from_best": {
            v: {"mean": d.mean, "ci95_low": d.low, "ci95_high": d.high} for v, d in differences.items()
        },
        "rule": "best mean validation accuracy; strategies whose test-accuracy difference from it has a 95% "
        "interval (seeds and test images, paired on images) containing 0; the cheapest of those in measured "
        "compute (tuning + one training run + feature extraction)",
    }
