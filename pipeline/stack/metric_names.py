"""Every MLflow metric name the pipeline logs, in one module: what a stage's numbers are called
in the MLflow UI. An observer for the stages that train (pipeline/runtime/code_deps.py): renaming a
metric here reruns only the register stage, which logs the registered run's metrics.

MLflow's chart view makes one section per name prefix (everything before the last "/") and
orders sections alphabetically, ungrouped names last ("Model metrics"), system metrics after them
(MLflow 3.x `RunsChartsCardConfig.getBaseChartAndSectionConfigs`). The prefixes are chosen so that
the sections read in review order, and the same names are used by tune trials, train runs, the
studies' runs and the baselines:

    curves/               per epoch: train_loss, train_accuracy, val_loss, val_accuracy
    evaluation/           the run's result: test_accuracy, test_macro_f1, best_val_accuracy,
                          best_epoch, epochs_run, stopped_early, epochs_to_target (baselines:
                          test_accuracy, test_macro_f1, val_accuracy; tune trials: best_*)
    evaluation/recall/    test recall per class, one section
    parameters/           trainable / non_trainable / total, trainable_<block>
    robustness/           accuracy under each corruption, mean_drop
    timing/               per epoch: epoch_seconds; per run: train_seconds, extraction_seconds, ...
    tuning/               the tune stage's study run: best_value, trials, epochs_run, the curve
    weight_drift/         per epoch: <block>; per run: final_<block>
    <source>/<predictor>  the predict stage's scores (n<size>/... per sample-efficiency size),
    rgn/<layer>           and its relative gradient norms

Report and register runs log no curves/ or evaluation/ names: they never join the training charts.
"""

from __future__ import annotations

import re

from pipeline.core.results import SEED_HEADLINE

CURVES = "curves/"
BASELINE_EVALUATION = ("test_accuracy", "test_macro_f1", "val_accuracy")  # beside the strategies' runs


def metric_part(name: str) -> str:
    """A class name as one part of a metric name: MLflow's sections split at "/" (`T-shirt/top`
    becomes `T-shirt_top`), and characters MLflow refuses in names become `_`."""
    return re.sub(r"[^\w\-. ]", "_", name)


def epoch_metric(key: str) -> str:
    """A Keras epoch-log key (`loss`, `val_accuracy`, `drift_block5`, `epoch_seconds`) as logged."""
    if key.startswith("drift_"):
        return f"weight_drift/{key[len('drift_') :]}"
    if key == "epoch_seconds":
        return "timing/epoch_seconds"
    if key.startswith("val_"):
        return f"{CURVES}{key}"
    return f"{CURVES}train_{key}"


def seed_run(metrics: dict, frozen_weights_unchanged: bool) -> dict[str, float]:
    """A trained seed's metrics.json (pipeline/core/results.py's per-seed record) as MLflow metrics."""
    named = {f"evaluation/{k}": _number(metrics[k]) for k in (*SEED_HEADLINE, "epochs_to_target")}
    named |= {f"evaluation/recall/{metric_part(c)}": v for c, v in metrics["test_recall_per_class"].items()}
    parameters = metrics["parameters"]
    named |= {f"parameters/{k}": v for k, v in parameters.items() if k != "per_block"}
    named |= {f"parameters/trainable_{block}": c["trainable"] for block, c in parameters["per_block"].items()}
    named["parameters/frozen_weights_unchanged"] = int(frozen_weights_unchanged)
    named |= {f"timing/{k}": v for k, v in metrics["timing"].items()}
    named |= {f"weight_drift/final_{block}": v for block, v in metrics["weight_drift"].items()}
    if "robustness" in metrics:
        named |= {f"robustness/accuracy_{k}": v for k, v in metrics["robustness"]["accuracy"].items()}
        named["robustness/mean_drop"] = metrics["robustness"]["mean_drop"]
    return named


def _number(value):
    """A bool as 0 / 1 (MLflow takes numbers only); None (no value: a target never reached) stays
    None, which `tracking.log_metrics` leaves out."""
    return int(value) if isinstance(value, bool) else value


def trial(epochs_run: int, best_val_accuracy: float | None = None, best_epoch: int | None = None) -> dict:
    """A tune trial's result; a pruned trial has only its epochs."""
    named = {"evaluation/epochs_run": epochs_run}
    if best_val_accuracy is not None:
        named |= {"evaluation/best_val_accuracy": best_val_accuracy, "evaluation/best_epoch": best_epoch}
    return named


def study(best: dict) -> dict[str, float]:
    """The tune stage's best_params.json as its study run's metrics."""
    budget = best["budget"]
    return {
        "tuning/best_value": best["value"],
        "tuning/trials": budget["trials_run"],
        "tuning/pruned_trials": budget["pruned_trials"],
        "tuning/capped_trials": budget["capped_trials"],
        "tuning/epochs_run": budget["epochs_run"],
        "tuning/validation_standard_error": best["validation"]["standard_error"],
    }


def tuning_curve_point(expected: float, std: float) -> dict[str, float]:
    """One step (n trials) of the tuning curve: the expected best validation accuracy, its std."""
    return {"tuning/expected_best_val_accuracy": expected, "tuning/expected_best_std": std}


def baseline(record: dict) -> dict[str, float]:
    """A baseline's record in results/baselines/metrics.json as its run's metrics."""
    return {f"evaluation/{k}": v for k, v in record.items() if k in BASELINE_EVALUATION}


def registered(summary: dict) -> dict[str, float]:
    """The registered strategy's headline numbers (its metrics.json less the per-seed records)."""
    return {f"registered/{k}": v for k, v in summary.items() if k != "seeds"}


def predictions(record: dict, predictors: tuple[str, ...]) -> dict[str, float]:
    """The predict stage's scores.json as metrics: `<source>/<predictor>`, `rgn/<layer>`, and
    `n<size>/<source>/<predictor>` per sample-efficiency size."""
    named = {f"{source}/{k}": v for source, s in record["sources"].items() for k, v in s.items() if k in predictors}
    named |= {f"rgn/{layer}": v for layer, v in record["relative_gradient_norm"]["per_layer"].items()}
    named |= {
        f"n{n}/{source}/{k}": v
        for n, size in record["sample_efficiency"].items()
        for source, s in size["sources"].items()
        for k, v in s.items()
    }
    return named
