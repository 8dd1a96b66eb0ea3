"""The files under results/ that one stage writes and another reads: their one definition.

train (results/train/<strategy>/; the studies write the same layout under results/studies/):
  seeds/<seed>/history.csv           one row per epoch, HISTORY_COLUMNS
  seeds/<seed>/metrics.json          test metrics, convergence, parameter counts, drift, `timing`
  seeds/<seed>/test_predictions.csv  image,label,predicted: every paired comparison is computed on these
  seeds/<seed>/confusion_matrix.csv  rows: true class, columns: predicted class
  metrics.json                       per-seed headline numbers, their mean, the best seed
  model.keras                        (written by the train stage: a Keras file, not a table)
baselines (results/baselines/; per training-set size under results/studies/sample_efficiency/baselines/n<N>/):
  metrics.json, predictions/<baseline>.csv (the study: predictions/<baseline>/<seed>.csv)
tune (results/tune/<strategy>/):
  best_params.json, trials.csv (TRIAL_COLUMNS); figures/ and the Optuna journal are the tune stage's own

Writers take plain values and write inside a folder the caller makes atomic; readers raise
DataError naming the stage to rerun. Light on purpose: the report reads results without
importing TensorFlow.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from pipeline.core.vgg16 import BLOCKS
from pipeline.runtime.atomic import write_json, write_text
from pipeline.runtime.errors import ConfigError, DataError

# the reference baselines' names (results/baselines, candidates of the answer beside the strategies)
PIXELS, PROBE = "pixels_logistic_regression", "frozen_linear_probe"
# reports/summary.json: one key per strategy, and these sections beside them
BASELINES_SECTION, ANSWER_SECTION, CONVERSIONS_SECTION = "baselines", "answer", "data_conversions"
SUMMARY_SECTIONS = (BASELINES_SECTION, ANSWER_SECTION, CONVERSIONS_SECTION)
DRIFT_COLUMNS = tuple(f"drift_{block}" for block in BLOCKS)
HISTORY_COLUMNS = (
    "epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy",
    "epoch_seconds", "cumulative_seconds", "images_seen", *DRIFT_COLUMNS,
)  # fmt: skip
TIMING_COLUMNS = ("epoch_seconds", "cumulative_seconds")
TRIAL_COLUMNS = (
    "trial", "state", "value", "rung_value", "head_units", "learning_rate", "best_epoch", "epochs_run",
    "stopped_early", "train_seconds", "seconds",
)  # fmt: skip
CONVERGENCE = ("best_epoch", "epochs_run", "max_epochs", "stopped_early")
COST_KEYS = ("epochs_run", "warmup_epochs", "training_path", "head_units", "train_images", "cut_after")
SEED_HEADLINE = ("test_accuracy", "test_macro_f1", "best_val_accuracy", "best_epoch", "epochs_run", "stopped_early")
# one seed's metrics.json: `write_seed` writes and `_load_seed` reads exactly these keys (`robustness`
# only with studies.robustness on); deterministic values at the top, wall-clock ones under `timing`
SEED_KEYS = (
    "test_accuracy", "test_macro_f1", "test_recall_per_class", "best_val_accuracy", "best_epoch", "epochs_run",
    "max_epochs", "stopped_early", "patience", "min_delta", "target_accuracy", "epochs_to_target", "parameters",
    "head_units", "learning_rate", "cut_after", "training_path", "frozen_weights_unchanged", "warmup_epochs",
    "weight_drift", "train_images", "timing",
)  # fmt: skip
SEED_OPTIONAL = ("robustness",)
SEED_TIMING = (
    "train_seconds", "feature_seconds", "extraction_seconds", "seconds_per_epoch", "first_epoch_seconds",
    "seconds_to_target",
)  # fmt: skip


# --- train ----------------------------------------------------------------------------------


def write_seed(
    folder: Path, history: list[dict], metrics: dict, labels: np.ndarray, probabilities: np.ndarray, confusion, classes
) -> None:
    """One seed's files into `folder` (created): history, metrics (exactly SEED_KEYS, SEED_TIMING
    under `timing`; a ValueError otherwise: a bug in the writer), test predictions, confusion matrix."""
    problem = _seed_schema_problem(metrics)
    if problem:
        raise ValueError(f"per-seed metrics {problem}")
    folder.mkdir(parents=True)
    (folder / "history.csv").write_text(_table(HISTORY_COLUMNS, history))
    write_json(folder / "metrics.json", metrics, sort_keys=False)
    (folder / "test_predictions.csv").write_text(predictions_csv(labels, probabilities))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["true\\predicted", *classes])
    writer.writerows([name, *row] for name, row in zip(classes, confusion, strict=True))
    (folder / "confusion_matrix.csv").write_text(out.getvalue())


def _seed_schema_problem(metrics: dict) -> str | None:
    """What differs between `metrics` and the per-seed schema, or None."""
    missing = [k for k in SEED_KEYS if k not in metrics] + [
        f"timing.{k}" for k in SEED_TIMING if k not in metrics.get("timing", {})
    ]
    unknown = [k for k in metrics if k not in SEED_KEYS and k not in SEED_OPTIONAL]
    unknown += [f"timing.{k}" for k in metrics.get("timing", {}) if k not in SEED_TIMING]
    if not missing and not unknown:
        return None
    return "; ".join(filter(None, [missing and f"lack {missing}", unknown and f"have unknown keys {unknown}"]))


def _load_seed(path: Path) -> dict:
    """One seed's metrics.json, checked against the schema `write_seed` writes."""
    metrics = json.loads(path.read_text())
    problem = _seed_schema_problem(metrics)
    if problem:
        raise DataError(
            f"{path} was written by other code: its metrics {problem}; rerun the stage that wrote it "
            "(`dvc repro -f train@<variant>`)"
        )
    return metrics


def strategy_summary(variant: str, per_seed: dict[int, dict]) -> dict:
    """A strategy's metrics.json from its seeds' metrics: headline numbers per seed, their mean,
    and the best seed (highest validation accuracy; ties: the lower seed)."""
    accuracies = [m["test_accuracy"] for m in per_seed.values()]
    best_seed = max(per_seed, key=lambda s: (per_seed[s]["best_val_accuracy"], -s))
    first = next(iter(per_seed.values()))
    return {
        "variant": variant,
        "test_accuracy_mean": float(np.mean(accuracies)),
        "test_accuracy_std": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
        "test_macro_f1_mean": float(np.mean([m["test_macro_f1"] for m in per_seed.values()])),
        "best_val_accuracy_mean": float(np.mean([m["best_val_accuracy"] for m in per_seed.values()])),
        "best_seed": best_seed,
        "params_trainable": first["parameters"]["trainable"],
        "params_total": first["parameters"]["total"],
        "seeds": {str(seed): {k: m[k] for k in SEED_HEADLINE} for seed, m in per_seed.items()},
    }


def write_strategy(folder: Path, variant: str, per_seed: dict[int, dict]) -> None:
    write_json(folder / "metrics.json", strategy_summary(variant, per_seed), sort_keys=False)


def _seeds_dir(train_dir: Path, variant: str) -> tuple[Path, list[int]]:
    seeds_dir = Path(train_dir) / variant / "seeds"
    if not seeds_dir.is_dir():
        raise DataError(f"{seeds_dir} not found; run `dvc repro train@{variant}` first")
    seeds = sorted(int(p.name) for p in seeds_dir.iterdir() if p.is_dir())
    if not seeds:
        raise DataError(f"{seeds_dir} holds no seed results; rerun `dvc repro train@{variant}`")
    return seeds_dir, seeds


def read_strategy(train_dir: Path, variant: str) -> dict:
    """One strategy's per-seed results: histories, test accuracy and macro-F1, convergence,
    epochs to the target, drift, robustness, the summed confusion matrix, and the settings all
    seeds share (parameters, head_units, learning_rate, ...)."""
    seeds_dir, seeds = _seeds_dir(train_dir, variant)
    keys = ("histories", "test_accuracy", "macro_f1", "epochs_to_target", "seconds_per_epoch", "weight_drift")
    result: dict = {key: {} for key in (*keys, "robustness", "convergence")}
    confusion = None
    for seed in seeds:
        metrics = _load_seed(seeds_dir / str(seed) / "metrics.json")
        with (seeds_dir / str(seed) / "history.csv").open() as f:
            result["histories"][seed] = [_history_row(row) for row in csv.DictReader(f)]
        result["test_accuracy"][seed] = metrics["test_accuracy"]
        result["macro_f1"][seed] = metrics["test_macro_f1"]
        result["epochs_to_target"][seed] = metrics["epochs_to_target"]
        result["seconds_per_epoch"][seed] = metrics["timing"]["seconds_per_epoch"]
        result["convergence"][seed] = {k: metrics[k] for k in CONVERGENCE}
        result["weight_drift"][seed] = metrics["weight_drift"]
        if "robustness" in metrics:
            result["robustness"][seed] = metrics["robustness"]
        with (seeds_dir / str(seed) / "confusion_matrix.csv").open() as f:
            matrix = np.array([[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]])
        confusion = matrix if confusion is None else confusion + matrix
        shared = ("parameters", "head_units", "learning_rate", "training_path", "target_accuracy", "warmup_epochs")
        result.update({key: metrics[key] for key in shared}, train_images=metrics["train_images"])
        result["cut_after"] = metrics["cut_after"]
    result["confusion"] = confusion.tolist()
    return result


def _history_row(row: dict) -> dict:
    """A history.csv row as numbers (`phase` stays text)."""
    return {k: (v if k == "phase" else float(v)) for k, v in row.items()}


def read_strategy_summary(train_dir: Path, variant: str) -> dict:
    """A strategy's metrics.json (`strategy_summary`)."""
    path = Path(train_dir) / variant / "metrics.json"
    if not path.is_file():
        raise DataError(f"{path} not found; run `dvc repro train@{variant}` first")
    return json.loads(path.read_text())


def read_seed_metrics(train_dir: Path, variant: str, seed: int) -> dict:
    """One seed's metrics.json."""
    seeds_dir, _ = _seeds_dir(train_dir, variant)
    return _load_seed(seeds_dir / str(seed) / "metrics.json")


def read_test_correct(train_dir: Path, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, seeds x test images 0/1) of a strategy's seeds, in seed order (`read_correct`)."""
    seeds_dir, seeds = _seeds_dir(train_dir, variant)
    return read_correct([seeds_dir / str(s) / "test_predictions.csv" for s in seeds])


def read_evidence(train_dir: Path, tune_dir: Path | None, variant: str) -> dict:
    """One strategy's inputs to the recommendation rule (pipeline/analysis/recommendation.py):
    {"val_accuracy", "correct" (seeds x images 0/1), "labels", "seeds", "params_trainable",
    "runs" (per seed: what its cost depends on, COST_KEYS), "trials" (per counted tune trial:
    head_units and epochs_run), "compute_seconds" and its parts}. `tune_dir` None: not tuned (the
    sample-efficiency study reuses the main comparison's hyperparameters)."""
    seeds_dir, seeds = _seeds_dir(train_dir, variant)
    trials_csv = None if tune_dir is None else Path(tune_dir) / variant / "trials.csv"
    metrics = [_load_seed(seeds_dir / str(s) / "metrics.json") for s in seeds]
    labels, correct = read_test_correct(train_dir, variant)
    tuning = tuning_seconds(trials_csv)
    training = float(np.mean([m["timing"]["train_seconds"] for m in metrics]))
    extraction = max(m["timing"]["extraction_seconds"] for m in metrics)
    return {
        "val_accuracy": float(np.mean([m["best_val_accuracy"] for m in metrics])),
        "correct": correct,
        "labels": labels,
        "seeds": seeds,
        "params_trainable": metrics[0]["parameters"]["trainable"],
        "runs": [{k: m.get(k) for k in COST_KEYS} for m in metrics],
        "trials": tuning_trials(trials_csv),
        "compute_seconds": tuning + training + extraction,
        "compute_parts": {"tuning": tuning, "training_per_run": training, "feature_extraction": extraction},
    }


# --- test predictions: what every paired comparison is computed on ----------------------------


def predictions_csv(labels: np.ndarray, probabilities: np.ndarray) -> str:
    """Per test image, in the prepared order: `image,label,predicted`."""
    predicted = probabilities.argmax(axis=1)
    rows = (f"{i},{int(label)},{int(p)}" for i, (label, p) in enumerate(zip(labels, predicted, strict=True)))
    return "image,label,predicted\n" + "\n".join(rows) + "\n"


def read_predictions(path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predicted) from a `predictions_csv` file."""
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    return table[:, 1], table[:, 2]


def read_correct(prediction_files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, seeds x images 0/1 matrix) from per-seed prediction files of one test set; a
    DataError when the files disagree on the images (a comparison needs the same test set)."""
    predictions = [read_predictions(path) for path in prediction_files]
    labels = predictions[0][0]
    for path, (other, _) in zip(prediction_files, predictions, strict=True):
        if not np.array_equal(other, labels):
            raise DataError(f"{path} holds another test set than {prediction_files[0]}; rerun the stage that wrote it")
    return labels, np.array([predicted == labels for _, predicted in predictions], dtype=np.int8)


# --- baselines --------------------------------------------------------------------------------


def write_baselines(folder: Path, records: dict[str, dict], labels: np.ndarray, probabilities: dict) -> None:
    """The main comparison's baselines: metrics.json and predictions/<baseline>.csv."""
    (folder / "predictions").mkdir()
    for name in records:
        (folder / "predictions" / f"{name}.csv").write_text(predictions_csv(labels, probabilities[name]))
    write_json(folder / "metrics.json", records)


def write_seed_predictions(folder: Path, baseline: str, seed: int, labels: np.ndarray, probabilities) -> None:
    """A study's baseline predictions for one seed: predictions/<baseline>/<seed>.csv."""
    (folder / "predictions" / baseline).mkdir(parents=True, exist_ok=True)
    (folder / "predictions" / baseline / f"{seed}.csv").write_text(predictions_csv(labels, probabilities))


def write_sample_baselines(folder: Path, per_class: int, per_seed: dict[str, dict[int, dict]]) -> None:
    """A sample-efficiency size's metrics.json: {baseline: mean, size, per-seed records}."""
    summary = {
        name: {
            "test_accuracy_mean": float(np.mean([r["test_accuracy"] for r in seeds.values()])),
            "train_per_class": per_class,
            "seeds": {str(seed): record for seed, record in seeds.items()},
        }
        for name, seeds in per_seed.items()
    }
    write_json(folder / "metrics.json", summary)


def read_baselines(folder: Path) -> dict:
    """{baseline: metrics record + "labels" + "correct" (1 x test images)}, or {} when the
    baselines stage has not run."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        return {}
    out = {}
    for name, record in json.loads(path.read_text()).items():
        labels, predicted = read_predictions(Path(folder) / "predictions" / f"{name}.csv")
        out[name] = {**record, "labels": labels, "correct": (predicted == labels)[None, :].astype(np.int8)}
    return out


def read_cut_probes(folder: Path) -> dict[str, dict]:
    """{cut: probe record} from the baselines stage's probes_by_cut.json ({} when absent)."""
    path = Path(folder) / "probes_by_cut.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def read_sample_baselines(folder: Path, per_class: int) -> dict[str, dict] | None:
    """{baseline: {"labels", "correct" (seeds x images), "C" per seed, "records" per seed}} of one
    sample-efficiency size, or None when its baselines stage has not run."""
    path = Path(folder) / f"n{per_class}" / "metrics.json"
    if not path.is_file():
        return None
    out = {}
    for name, record in json.loads(path.read_text()).items():
        seeds = sorted(record["seeds"], key=int)
        files = [path.parent / "predictions" / name / f"{s}.csv" for s in seeds]
        labels, correct = read_correct(files)
        out[name] = {
            "labels": labels,
            "correct": correct,
            "C": {int(s): record["seeds"][s]["C"] for s in seeds},
            "records": {int(s): record["seeds"][s] for s in seeds},
        }
    return out


# --- tune -------------------------------------------------------------------------------------


def write_tuning(folder: Path, best: dict, trials: list[dict]) -> None:
    """trials.csv (one row per counted trial, TRIAL_COLUMNS) and best_params.json."""
    write_text(folder / "trials.csv", _table(TRIAL_COLUMNS, trials))
    write_json(folder / "best_params.json", best)


def read_tuning(tune_dir: Path, variant: str) -> dict | None:
    """{"best": best_params.json, "trials": trials.csv rows} of one strategy, or None when it was
    not tuned."""
    best_path = Path(tune_dir) / variant / "best_params.json"
    if not best_path.is_file():
        return None
    with (best_path.parent / "trials.csv").open() as f:
        numbers = {"value", "rung_value"}
        trials = [
            {**row, "trial": int(row["trial"]), **{k: _number(row[k]) for k in numbers}} for row in csv.DictReader(f)
        ]
    return {"best": json.loads(best_path.read_text()), "trials": trials}


def read_best_params(path: Path) -> dict:
    """head_units and learning_rate from a best_params.json; ConfigError naming the fix."""
    if not path.is_file():
        raise ConfigError("--best-params", f"{path} not found; run `dvc repro tune@<variant>` or omit the option")
    best = json.loads(path.read_text())
    for key in ("head_units", "learning_rate"):
        if key not in best:
            raise ConfigError(str(path), f"has no {key!r}; rerun the tune stage")
    return {"head_units": int(best["head_units"]), "learning_rate": float(best["learning_rate"])}


def tuning_seconds(trials_csv: Path | None) -> float:
    """Training seconds of every counted tune trial (0.0 when the strategy was not tuned)."""
    if trials_csv is None or not trials_csv.is_file():
        return 0.0
    with trials_csv.open() as f:
        return float(sum(float(row["train_seconds"] or 0.0) for row in csv.DictReader(f)))


def tuning_trials(trials_csv: Path | None) -> list[dict]:
    """[{"head_units", "epochs_run"}] of every counted tune trial ([] when not tuned)."""
    if trials_csv is None or not trials_csv.is_file():
        return []
    with trials_csv.open() as f:
        return [{"head_units": int(r["head_units"]), "epochs_run": int(r["epochs_run"])} for r in csv.DictReader(f)]


def _number(text: str):
    return None if text in ("", "None") else float(text)


def _table(columns, rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
