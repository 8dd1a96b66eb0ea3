"""Stage `train@<variant>`: train one freezing strategy for every seed, evaluate, log to MLflow.

Also the studies' stages: `--depth K` trains the depth sweep's strategy top<K> (the top K conv
layers) over `studies.depth.seeds` (`depth_train@<k>`); `--train-per-class N` trains the strategy
on N images per class over `studies.sample_efficiency.seeds` (`sample_efficiency@<variant>-<N>`):
the pool (the largest size of the study) is prepared in-process from `data`, each seed trains on
the first N per class of its own shuffle of the pool (nested sizes), features of the pool are
cached once and shared by every size and seed.

Reads params.yaml (`seed`, `model`, `train`, `variants.<variant>`, `mlflow`, `report`), the
prepared data (`--prepared`), and the tuned hyperparameters (`--best-params`, optional: without
it `model.head_units` and `train.learning_rate` apply). Writes, atomically, into `--out`
(results/train/<variant>):
  metrics.json                   per-seed and mean test metrics (a DVC metric)
  model.keras                    the model of the seed with the best validation accuracy
  seeds/<seed>/history.csv       per epoch: loss, accuracy, val_loss, val_accuracy, timings
  seeds/<seed>/metrics.json      test metrics, best epoch, epochs run, max epochs, whether patience
                                 stopped it (convergence), parameter counts, weight drift per block,
                                 robustness (studies.robustness.enabled), timings
  seeds/<seed>/confusion_matrix.csv
  seeds/<seed>/test_predictions.csv  per test image: label, predicted class (paired comparisons)
and one MLflow run per seed (`train/<variant>/seed-<seed>`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np

from pipeline import tracking
from pipeline.atomic import atomic_dir, ensure_writable
from pipeline.cli import run_stage
from pipeline.data import load_split, load_summary, nested_subset
from pipeline.errors import ConfigError
from pipeline.evaluation import epochs_to_target, evaluate, predictions_csv, robustness
from pipeline.features import FeatureCache, extraction_batch_size
from pipeline.model import count_parameters
from pipeline.params import Params, load_params
from pipeline.training import HISTORY_COLUMNS, RunConfig, Splits, fit_variant
from pipeline.weights import load_base_weights


def hyperparameters(params: Params, best_params_path: Path | None) -> dict:
    """head_units and learning_rate from the tune stage's best_params.json when given, else
    `model.head_units` and `train.learning_rate`."""
    if best_params_path is not None:
        if not best_params_path.is_file():
            raise ConfigError(
                "--best-params", f"{best_params_path} not found; run `dvc repro tune@<variant>` or omit the option"
            )
        best = json.loads(best_params_path.read_text())
        for key in ("head_units", "learning_rate"):
            if key not in best:
                raise ConfigError(str(best_params_path), f"has no {key!r}; rerun the tune stage")
        return {"head_units": int(best["head_units"]), "learning_rate": float(best["learning_rate"]), "source": "tuned"}
    return {"head_units": params.model.head_units, "learning_rate": params.train.learning_rate, "source": "params.yaml"}


def seed_metrics(result, evaluation: dict, config: RunConfig, target: float) -> dict:
    """The per-seed metrics.json: deterministic values at the top, wall-clock ones under `timing`."""
    epoch_target, seconds_target = epochs_to_target(result.history, target)
    epoch_seconds = [row["epoch_seconds"] for row in result.history]
    return {
        **{k: v for k, v in evaluation.items() if k != "confusion_matrix"},
        "best_val_accuracy": result.best_val_accuracy,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "max_epochs": config.max_epochs,
        "stopped_early": result.stopped_early,
        "patience": config.patience,
        "min_delta": config.min_delta,
        "target_accuracy": target,
        "epochs_to_target": epoch_target,
        "parameters": count_parameters(result.model),
        "head_units": config.head_units,
        "learning_rate": config.learning_rate,
        "training_path": result.path,
        "frozen_weights_unchanged": result.frozen_weights_unchanged,
        "warmup_epochs": result.warmup_epochs,
        "weight_drift": result.weight_drift,
        "timing": {
            "train_seconds": result.train_seconds,
            "feature_seconds": result.feature_seconds,
            "extraction_seconds": result.extraction_seconds,
            "seconds_per_epoch": float(np.median(epoch_seconds)),
            "first_epoch_seconds": epoch_seconds[0],
            "seconds_to_target": seconds_target,
        },
    }


def history_csv(history: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def confusion_csv(matrix: list[list[int]], class_names: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["true\\predicted", *class_names])
    for name, row in zip(class_names, matrix, strict=True):
        writer.writerow([name, *row])
    return out.getvalue()


def variant_summary(variant: str, per_seed: dict[int, dict]) -> dict:
    """The variant's metrics.json: per-seed headline numbers, their mean, and the best seed."""
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
        "seeds": {
            str(seed): {
                k: m[k]
                for k in (
                    "test_accuracy",
                    "test_macro_f1",
                    "best_val_accuracy",
                    "best_epoch",
                    "epochs_run",
                    "stopped_early",
                )
            }
            for seed, m in per_seed.items()
        },
    }


def _model_summary(model) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    return "\n".join(lines) + "\n"


def _save_model(model, path: Path) -> None:
    """Save without optimizer state (half the size; the saved model is for inference)."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    clone.save(path)


def _setup(args, params: Params):
    """(params, variant, seeds, MLflow run-name prefix, study name or None) for the chosen mode."""
    if args.depth is not None:
        params, variant = params.with_depth(args.depth)
        return params, variant, params.studies.depth.seeds, f"depth/{variant}", "depth"
    variant = args.variant
    params.variant(variant)  # unknown variant -> ConfigError listing the defined ones
    if args.train_per_class is not None:
        prefix = f"sample_efficiency/{variant}/n{args.train_per_class}"
        return params, variant, params.studies.sample_efficiency.seeds, prefix, "sample_efficiency"
    return params, variant, params.train_seeds(variant), f"train/{variant}", None


def _load_data(args, params: Params):
    """(splits, summary): the prepared data, or for --train-per-class the study's pool."""
    if args.train_per_class is None:
        prepared = Path(args.prepared)
        splits = Splits(load_split(prepared, "train"), load_split(prepared, "val"), load_split(prepared, "test"))
        return splits, load_summary(prepared)
    from pipeline.prepare import sample_efficiency_pool

    pool = sample_efficiency_pool(params, args.train_per_class)
    return Splits(pool.splits["train"], pool.splits["val"], pool.splits["test"]), pool.summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--variant", help="a key of params.yaml `variants`")
    which.add_argument("--depth", type=int, help="the depth sweep's strategy top<K>: train the top K conv layers")
    parser.add_argument("--train-per-class", type=int, help="sample-efficiency study: train on N images per class")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", default="data/prepared", help="the prepare stage's output folder")
    parser.add_argument("--best-params", type=Path, help="tune stage's best_params.json (optional)")
    parser.add_argument("--out", type=Path, help="output folder (default: results/train/<variant>)")
    parser.add_argument("--no-model", action="store_true", help="do not save model.keras (the studies)")
    parser.add_argument(
        "--feature-cache", default=".cache/features", help="cached prefix features (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.train_per_class is not None and args.train_per_class < 1:
        raise ConfigError("--train-per-class", f"{args.train_per_class} is not allowed; it must be at least 1")
    if args.train_per_class is not None and args.depth is not None:
        raise ConfigError("--train-per-class", "cannot be combined with --depth; run one study at a time")

    params, variant, seeds, prefix, study = _setup(args, load_params(args.params))
    out = args.out or Path("results/train") / variant
    hyper = hyperparameters(params, args.best_params)
    ensure_writable(out.parent, "--out")  # before any training, not after it
    if params.train.cache_features:
        ensure_writable(args.feature_cache, "--feature-cache")
    splits, summary = _load_data(args, params)
    # what the runs trained on: the prepared folder, or for the study's pool the raw source
    raw = params.data.directory or params.data.fashion_mnist_dir or params.data.source
    data_source = str(Path(args.prepared).resolve()) if args.train_per_class is None else str(raw)
    class_names = summary["class_names"]
    weights_source = params.variant_weights(variant)
    weights = load_base_weights(weights_source)

    uri = tracking.resolve_tracking_uri(params.mlflow.tracking_uri, Path(args.params).resolve().parent)
    tracking.connect(uri, params.mlflow.experiment)  # fail fast, before any training
    environment = tracking.environment_tags()
    cache = FeatureCache(args.feature_cache)
    robust = params.studies.robustness
    per_seed: dict[int, dict] = {}
    best_seed_val = -1.0

    with atomic_dir(out) as tmp:
        for seed in seeds:
            config = RunConfig.from_params(
                params,
                variant,
                head_units=hyper["head_units"],
                learning_rate=hyper["learning_rate"],
                num_classes=len(class_names),
                seed=seed,
            )
            seed_splits = splits
            if args.train_per_class is not None:
                index = nested_subset(splits.train[1], args.train_per_class, [params.seed, seed])
                seed_splits = dataclasses.replace(splits, train_index=index)
            run_name = f"{prefix}/seed-{seed}"
            print(
                f"[{run_name}] {hyper['source']} head_units={config.head_units} lr={config.learning_rate:.3g}",
                flush=True,
            )
            tags, run_params = _run_metadata(params, variant, config, weights, weights_source, summary, hyper)
            if study:
                tags["study"] = study
                run_params["study"] = {"name": study, "train_per_class": args.train_per_class}
            with tracking.run(
                run_name, tags={**tags, **environment}, params=run_params, system_metrics=params.mlflow.system_metrics
            ):
                tracking.log_datasets(
                    data_source,
                    tracking.dataset_name(summary),
                    tracking.split_digests(summary, seed_splits.train_index),
                )
                result = fit_variant(
                    config,
                    weights,
                    seed_splits,
                    summary["data_sha256"],
                    cache,
                    [tracking.EpochLogger(), tracking.ProgressLine(run_name, config.max_epochs)],
                )
                evaluation = evaluate(splits.test[1], result.test_probabilities, class_names)
                metrics = seed_metrics(result, evaluation, config, params.report.target_accuracy)
                index = seed_splits.train_index
                metrics["train_images"] = len(splits.train[1]) if index is None else len(index)
                if robust.enabled:
                    metrics["robustness"] = robustness(
                        result.model,
                        splits.test[0],
                        splits.test[1],
                        evaluation["test_accuracy"],
                        robust.corruptions,
                        robust.severity,
                        robust.seed,
                        extraction_batch_size(config.image_size),
                    )
                seed_dir = tmp / "seeds" / str(seed)
                seed_dir.mkdir(parents=True)
                (seed_dir / "history.csv").write_text(history_csv(result.history))
                (seed_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
                (seed_dir / "test_predictions.csv").write_text(
                    predictions_csv(splits.test[1], result.test_probabilities)
                )
                (seed_dir / "confusion_matrix.csv").write_text(
                    confusion_csv(evaluation["confusion_matrix"], class_names)
                )
                _log_seed(result, metrics, evaluation, seed_dir, class_names, run_name)
                if not result.frozen_weights_unchanged:
                    raise RuntimeError(f"{run_name}: frozen weights changed during training (a bug; please report it)")
            per_seed[seed] = metrics
            print(
                f"[{run_name}] test accuracy {metrics['test_accuracy']:.4f}, best val {result.best_val_accuracy:.4f} "
                f"at epoch {result.best_epoch} of {len(result.history)} "
                f"({'stopped early' if result.stopped_early else 'max_epochs reached'}), {result.path}, "
                f"{result.train_seconds:.1f}s",
                flush=True,
            )
            if result.best_val_accuracy > best_seed_val and not args.no_model:
                best_seed_val = result.best_val_accuracy
                _save_model(result.model, tmp / "model.keras")
        (tmp / "metrics.json").write_text(json.dumps(variant_summary(variant, per_seed), indent=2) + "\n")
    accuracies = [m["test_accuracy"] for m in per_seed.values()]
    seconds = sum(m["timing"]["train_seconds"] for m in per_seed.values())
    print(
        f"[{prefix}] {len(per_seed)} seeds: test accuracy mean {np.mean(accuracies):.4f} (min {min(accuracies):.4f}, "
        f"max {max(accuracies):.4f}), {seconds:.0f}s of training; written to {out}",
        flush=True,
    )


def _run_metadata(params: Params, variant: str, config: RunConfig, weights, weights_source, summary, hyper):
    """MLflow tags and (flattened later) params of one (variant, seed) run."""
    tags = {
        "stage": "train",
        "variant": variant,
        "seed": config.seed,
        "weights": weights_source,
        "weights_sha256": weights.sha256,
        "data_sha256": summary["data_sha256"],
        "hyperparameters": hyper["source"],
        "determinism": "on",
    }
    run_params = {
        "variant": variant,
        "seed": config.seed,
        "weights": weights_source,
        "trainable": params.variant(variant).trainable,
        "warmup_epochs": config.warmup_epochs,
        "lr_multipliers": dict(config.lr_multipliers),
        "data": vars(params.data),
        "model": {**vars(params.model), "head_units": config.head_units},
        "train": {**vars(params.train), "learning_rate": config.learning_rate},
    }
    return tags, run_params


def _log_seed(result, metrics: dict, evaluation: dict, seed_dir: Path, class_names: list[str], title: str) -> None:
    from pipeline.figures import confusion_matrix_figure, plt

    evaluation_keys = (
        "test_accuracy",
        "test_macro_f1",
        "best_val_accuracy",
        "best_epoch",
        "epochs_run",
        "stopped_early",
        "epochs_to_target",
    )
    tracking.log_metrics(
        {f"evaluation/{k}": int(metrics[k]) if k == "stopped_early" else metrics[k] for k in evaluation_keys}
    )
    recall = metrics["test_recall_per_class"]
    tracking.log_metrics({f"evaluation/recall/{tracking.metric_part(name)}": v for name, v in recall.items()})
    parameters = metrics["parameters"]
    tracking.log_metrics({f"parameters/{k}": v for k, v in parameters.items() if k != "per_block"})
    tracking.log_metrics({f"parameters/trainable_{b}": c["trainable"] for b, c in parameters["per_block"].items()})
    tracking.log_metrics({f"timing/{k}": v for k, v in metrics["timing"].items()})
    tracking.log_metrics({f"weight_drift/final_{block}": value for block, value in metrics["weight_drift"].items()})
    if "robustness" in metrics:
        robust = metrics["robustness"]
        tracking.log_metrics({f"robustness/accuracy_{k}": v for k, v in robust["accuracy"].items()})
        tracking.log_metrics({"robustness/mean_drop": robust["mean_drop"]})
    tracking.log_metrics({"parameters/frozen_weights_unchanged": int(result.frozen_weights_unchanged)})
    tracking.log_artifacts(sorted(seed_dir.iterdir()))
    figure = confusion_matrix_figure(evaluation["confusion_matrix"], class_names, f"{title}: test confusion matrix")
    tracking.log_figure(figure, "confusion_matrix.png")
    plt.close(figure)
    tracking.log_text(_model_summary(result.model), "model_summary.txt")


if __name__ == "__main__":
    run_stage(main)
