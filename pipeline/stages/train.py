"""Stage `train@<variant>`: train one freezing strategy for every seed, evaluate, log to MLflow.

Also the studies' stages: `--depth K` trains the depth sweep's strategy top<K> (the top K conv
layers) over `studies.depth.seeds` (`depth_train@<k>`); `--parameter-efficient NAME` a strategy of
studies.parameter_efficient over `train.seeds` (`parameter_efficient_train@<name>`, its models also
on the corrupted test set when the study's `robustness` is on); `--train-per-class N` trains the strategy
on N images per class over `studies.sample_efficiency.seeds` (`sample_efficiency@<variant>-<N>`):
the pool (the largest size of the study) is prepared in-process from `data`, each seed trains on
the first N per class of its own shuffle of the pool (nested sizes), features of the pool are
cached once and shared by every size and seed.

Reads params.yaml (the keys dvc.yaml lists for the stage; `mlflow` only to mirror the runs), the
prepared data (`--prepared`), and the tuned hyperparameters (`--best-params`, optional: without
it `model.head_units` and `train.learning_rate` apply). Writes, atomically, into `--out`
(results/train/<variant>; the format: pipeline/core/results.py):
  metrics.json                   per-seed headline numbers, their mean, the best seed
  model.keras                    the model of the seed with the best validation accuracy, as a
                                 plain VGG16 classifier (adapters merged into the kernels)
  seeds/<seed>/history.csv       per epoch: loss, accuracy, val_loss, val_accuracy, timings
  seeds/<seed>/metrics.json      test metrics, best epoch, epochs run, max epochs, whether patience
                                 stopped it (convergence), parameter counts, weight drift per block,
                                 robustness (studies.robustness.enabled, or the parameter-
                                 efficient study's `robustness`), timings
  seeds/<seed>/confusion_matrix.csv
  seeds/<seed>/test_predictions.csv  per test image: label, predicted class (paired comparisons)
and one MLflow run per seed (`train/<variant>/seed-<seed>`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import results
from pipeline.core.data import load_split, load_summary
from pipeline.core.evaluation import epochs_to_target, evaluate, robustness
from pipeline.core.fit import RunConfig, Splits, fit_variant
from pipeline.core.frozen_features import FeatureCache, extraction_batch_size
from pipeline.core.model import count_parameters, merge_for_serving
from pipeline.core.params import Params, load_params
from pipeline.core.splits import sample_efficiency_pool, study_subset
from pipeline.core.weights import load_base_weights
from pipeline.runtime.atomic import atomic_dir, ensure_writable
from pipeline.runtime.cli import add_strategy_arguments, run_stage
from pipeline.runtime.errors import ConfigError
from pipeline.runtime.progress import ProgressLine
from pipeline.stack import metric_names, tracking


def hyperparameters(params: Params, best_params_path: Path | None) -> dict:
    """head_units and learning_rate from the tune stage's best_params.json when given, else
    `model.head_units` and `train.learning_rate`."""
    if best_params_path is not None:
        return {**results.read_best_params(best_params_path), "source": "tuned"}
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
        "cut_after": config.cut_after,
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


@dataclass
class Training:
    """One strategy's stage run: what every seed shares."""

    params: Params
    variant: str
    prefix: str  # MLflow run names: <prefix>/seed-<seed>
    study: str | None  # "depth" / "sample_efficiency" for the studies' stages
    train_per_class: int | None
    hyper: dict
    splits: Splits
    summary: dict
    data_source: str  # what the runs trained on, logged as MLflow datasets
    weights_source: str
    cache: FeatureCache

    def __post_init__(self):
        self.weights = load_base_weights(self.weights_source)
        self.environment = tracking.environment_tags()

    def config(self, seed: int) -> RunConfig:
        return RunConfig.from_params(
            self.params,
            self.variant,
            head_units=self.hyper["head_units"],
            learning_rate=self.hyper["learning_rate"],
            num_classes=len(self.summary["class_names"]),
            seed=seed,
        )

    def seed_splits(self, seed: int) -> Splits:
        """The splits, for the sample-efficiency study with this seed's own subset of the pool."""
        if self.train_per_class is None:
            return self.splits
        index = study_subset(self.params, self.splits.train[1], self.train_per_class, seed)
        return dataclasses.replace(self.splits, train_index=index)

    def measure(self, result, evaluation: dict, config: RunConfig, splits: Splits) -> dict:
        """A trained seed's metrics.json (pipeline/core/results.py SEED_KEYS): its evaluation, the
        run's convergence and cost, and, with studies.robustness on, its accuracy under corruption."""
        metrics = seed_metrics(result, evaluation, config, self.params.report.target_accuracy)
        metrics["train_images"] = len(splits.train[1]) if splits.train_index is None else len(splits.train_index)
        robust = self.params.studies.robustness
        if self.robustness_on():
            test_images, test_labels = splits.test
            accuracy, batch = evaluation["test_accuracy"], extraction_batch_size(config.image_size)
            metrics["robustness"] = robustness(
                result.model,
                test_images,
                test_labels,
                accuracy,
                robust.corruptions,
                robust.severity,
                robust.seed,
                batch,
            )
        return metrics

    def robustness_on(self) -> bool:
        """studies.robustness.enabled, or for the parameter-efficient study's runs its own switch
        (both read: the params a stage declares are the ones it reads)."""
        study_switch = self.study == "parameter_efficient" and self.params.studies.parameter_efficient.robustness
        return self.params.studies.robustness.enabled or study_switch

    def run_seed(self, seed: int, folder: Path):
        """Train, evaluate and log one seed, its files written into `folder`; returns (metrics, fit result)."""
        config, splits, class_names = self.config(seed), self.seed_splits(seed), self.summary["class_names"]
        run_name = f"{self.prefix}/seed-{seed}"
        hyper = f"{self.hyper['source']} head_units={config.head_units} lr={config.learning_rate:.3g}"
        print(f"[{run_name}] {hyper}", flush=True)
        tags, run_params = self.run_metadata(config)
        with tracking.run(run_name, tags={**tags, **self.environment}, params=run_params, system_metrics=True):
            digests = tracking.split_digests(self.summary, splits.train_index)
            tracking.log_datasets(self.data_source, tracking.dataset_name(self.summary), digests)
            callbacks = [tracking.EpochLogger(), ProgressLine(run_name, config.max_epochs)]
            result = fit_variant(config, self.weights, splits, self.summary["data_sha256"], self.cache, callbacks)
            evaluation = evaluate(splits.test[1], result.test_probabilities, class_names)
            metrics = self.measure(result, evaluation, config, splits)
            confusion = evaluation["confusion_matrix"]
            results.write_seed(
                folder, result.history, metrics, splits.test[1], result.test_probabilities, confusion, class_names
            )
            _log_seed(result, metrics, evaluation, folder, class_names, run_name)
            if not result.frozen_weights_unchanged:
                raise RuntimeError(f"{run_name}: frozen weights changed during training (a bug; please report it)")
        stop = "stopped early" if result.stopped_early else "max_epochs reached"
        print(
            f"[{run_name}] test accuracy {metrics['test_accuracy']:.4f}, best val {result.best_val_accuracy:.4f} "
            f"at epoch {result.best_epoch} of {len(result.history)} ({stop}), {result.path}, "
            f"{result.train_seconds:.1f}s",
            flush=True,
        )
        return metrics, result

    def run_metadata(self, config: RunConfig) -> tuple[dict, dict]:
        """MLflow tags and (flattened later) params of one seed's run."""
        params = self.params
        tags = {
            "stage": "train",
            "variant": self.variant,
            "seed": config.seed,
            "weights": self.weights_source,
            "weights_sha256": self.weights.sha256,
            "data_sha256": self.summary["data_sha256"],
            "hyperparameters": self.hyper["source"],
            "determinism": "on",
        }
        run_params = {
            "variant": self.variant,
            "seed": config.seed,
            "weights": self.weights_source,
            "trainable": params.variant(self.variant).trainable,
            "cut_after": config.cut_after,
            "parameters": config.parameters,
            "lora_rank": config.lora_rank,
            "warmup_epochs": config.warmup_epochs,
            "lr_multipliers": dict(config.lr_multipliers),
            "data": vars(params.data),
            "model": {**vars(params.model), "head_units": config.head_units},
            "train": {**vars(params.train), "learning_rate": config.learning_rate},
        }
        if self.study:
            tags["study"] = self.study
            run_params["study"] = {"name": self.study, "train_per_class": self.train_per_class}
        return tags, run_params


def _model_summary(model) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    return "\n".join(lines) + "\n"


def _save_model(model, spec, path: Path) -> None:
    """Save for inference: a plain VGG16 classifier (LoRA merged, scale-and-shift folded into the
    kernels: `merge_for_serving`), without optimizer state (half the size)."""
    merge_for_serving(model, spec).save(path)


def _setup(args, params: Params):
    """(params, variant, seeds, MLflow run-name prefix, study name or None) for the chosen mode."""
    params, variant = params.select(args.variant, args.depth, args.cut, args.parameter_efficient)
    if args.depth is not None:
        return params, variant, params.studies.depth.seeds, f"depth/{variant}", "depth"
    if args.parameter_efficient is not None:
        return params, variant, params.train.seeds, f"parameter_efficient/{variant}", "parameter_efficient"
    if args.train_per_class is not None:
        prefix = f"sample_efficiency/{variant}/n{args.train_per_class}"
        return params, variant, params.studies.sample_efficiency.seeds, prefix, "sample_efficiency"
    return params, variant, params.train.seeds, f"train/{variant}", None


def _load_data(args, params: Params) -> tuple[Splits, dict, str]:
    """(splits, summary, source): the prepared data, or for --train-per-class the study's pool
    (the source names the folder or dataset the runs trained on)."""
    if args.train_per_class is None:
        prepared = Path(args.prepared)
        splits = Splits(load_split(prepared, "train"), load_split(prepared, "val"), load_split(prepared, "test"))
        return splits, load_summary(prepared), str(prepared.resolve())
    pool = sample_efficiency_pool(params, args.train_per_class)
    source = params.data.directory or params.data.fashion_mnist_dir or params.data.source
    return Splits(pool.splits["train"], pool.splits["val"], pool.splits["test"]), pool.summary, str(source)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_strategy_arguments(parser)
    parser.add_argument("--train-per-class", type=int, help="sample-efficiency study: train on N images per class")
    parser.add_argument("--params", required=True)
    parser.add_argument("--prepared", help="the prepare stage's output folder (not with --train-per-class)")
    parser.add_argument("--best-params", type=Path, help="tune stage's best_params.json (optional)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--no-model", action="store_true", help="do not save model.keras (the studies)")
    parser.add_argument("--feature-cache", required=True, help="cached prefix features (a folder outside DVC)")
    args = parser.parse_args(argv)
    if args.train_per_class is not None and args.train_per_class < 1:
        raise ConfigError("--train-per-class", f"{args.train_per_class} is not allowed; it must be at least 1")
    if args.train_per_class is not None and args.variant is None:
        raise ConfigError("--train-per-class", "needs --variant (a main strategy); run one study at a time")
    if args.train_per_class is None and args.prepared is None:
        raise ConfigError("--prepared", "is required: the prepare stage's output folder (data/prepared)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    params, variant, seeds, prefix, study = _setup(args, load_params(args.params))
    out = args.out
    hyper = hyperparameters(params, args.best_params)
    ensure_writable(out.parent, "--out")  # before any training, not after it
    if params.train.cache_features:
        ensure_writable(args.feature_cache, "--feature-cache")
    splits, summary, source = _load_data(args, params)
    tracking.open_store(params.mlflow, args.params)  # fail fast, before any training
    training = Training(
        params=params,
        variant=variant,
        prefix=prefix,
        study=study,
        train_per_class=args.train_per_class,
        hyper=hyper,
        splits=splits,
        summary=summary,
        data_source=source,
        weights_source=params.variant_weights(variant),
        cache=FeatureCache(args.feature_cache),
    )
    per_seed: dict[int, dict] = {}
    best_val = -1.0
    with atomic_dir(out) as tmp:
        for seed in seeds:
            per_seed[seed], result = training.run_seed(seed, tmp / "seeds" / str(seed))
            if result.best_val_accuracy > best_val and not args.no_model:
                best_val = result.best_val_accuracy
                _save_model(result.model, training.config(seed).model_spec, tmp / "model.keras")
        results.write_strategy(tmp, variant, per_seed)
    accuracies = [m["test_accuracy"] for m in per_seed.values()]
    seconds = sum(m["timing"]["train_seconds"] for m in per_seed.values())
    print(
        f"[{prefix}] {len(per_seed)} seeds: test accuracy mean {np.mean(accuracies):.4f} (min {min(accuracies):.4f}, "
        f"max {max(accuracies):.4f}), {seconds:.0f}s of training; written to {out}",
        flush=True,
    )


def _log_seed(result, metrics: dict, evaluation: dict, seed_dir: Path, class_names: list[str], title: str) -> None:
    from pipeline.core.plotting import confusion_matrix_figure, plt

    tracking.log_metrics(metric_names.seed_run(metrics, result.frozen_weights_unchanged))
    tracking.log_artifacts(sorted(seed_dir.iterdir()))
    figure = confusion_matrix_figure(evaluation["confusion_matrix"], class_names, f"{title}: test confusion matrix")
    tracking.log_figure(figure, "confusion_matrix.png")
    plt.close(figure)
    tracking.log_text(_model_summary(result.model), "model_summary.txt")


if __name__ == "__main__":
    run_stage(main)
