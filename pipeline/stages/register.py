"""Stage `register`: log the best strategy's model to MLflow and register it.

Reads every `results/train/<variant>/` (`--train-dir`: metrics, per-image test predictions,
model.keras), the tune records (`--tune-dir`, for the FLOP account), the baselines
(`--baselines-dir`, candidates of the answer too) and params.yaml `mlflow` and `report.margin`.
The strategy registered is the report's answer (`pipeline/analysis/recommendation.py`) among the networks:
the cheapest network shown non-inferior within the margin to the best on *validation*. When a
baseline is non-inferior too (training VGG16 does not pay off on this data), the model card says
so; the registered model is still that network. Writes `--out` (results/registered.json): the
variant, seed, model URI and version.

The registered model is an MLflow pyfunc model (`pipeline/stack/serving.py`, the project's code shipped
inside it) with a signature and an input example; its version carries a description and tags
(strategy, seeds, accuracy with interval, data sha256, weights, hyperparameters) and the alias
`champion` moves to it. Load it from any folder with
    mlflow.pyfunc.load_model("models:/<mlflow.registered_model>@champion").predict(images_uint8)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.analysis.recommendation import choose, read_inputs
from pipeline.core.data import load_split, load_summary
from pipeline.core.params import load_params
from pipeline.core.results import read_baselines, read_seed_metrics, read_strategy_summary
from pipeline.core.stats import accuracy_interval
from pipeline.runtime.atomic import ensure_writable, write_json
from pipeline.runtime.cli import run_stage
from pipeline.runtime.errors import DataError
from pipeline.stack import metric_names, registry, tracking

EXAMPLE_IMAGES = 3  # test images stored with the model as its input example


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", required=True)
    parser.add_argument("--train-dir", type=Path, required=True)
    parser.add_argument("--tune-dir", type=Path, required=True)
    parser.add_argument("--baselines-dir", type=Path, required=True)
    parser.add_argument("--prepared", type=Path, required=True, help="class names, example images")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    ensure_writable(args.out.parent, "--out")
    data = load_summary(args.prepared)
    baselines = read_baselines(args.baselines_dir)
    evidence, baseline_evidence = read_inputs(params, data, args.train_dir, args.tune_dir, baselines)
    chosen = choose(evidence, params.report.margin, baseline_evidence)
    variant = chosen["recommended_network"]
    summary = read_strategy_summary(args.train_dir, variant)
    model_path = args.train_dir / variant / "model.keras"
    if not model_path.is_file():
        raise DataError(f"{model_path} not found; rerun `dvc repro train@{variant}`")
    run = read_seed_metrics(args.train_dir, variant, summary["best_seed"])
    card = model_card(params, variant, summary, evidence[variant], chosen, data, run)

    tracking.open_store(params.mlflow, args.params)
    tags = {"stage": "register", "variant": variant, "seed": summary["best_seed"], **tracking.environment_tags()}
    selection = {"selection": chosen["rule"], "best_on_validation": chosen["best_on_validation"]}
    examples = load_split(args.prepared, "test")[0][:EXAMPLE_IMAGES]
    with tracking.run(f"register/{variant}", tags=tags, params=selection):
        tracking.log_metrics(metric_names.registered(summary))
        info = registry.log_classifier(
            model_path, args.prepared / "classes.json", examples, params.mlflow.registered_model, card
        )
    record = {
        "variant": variant,
        "seed": summary["best_seed"],
        "selection": chosen["rule"],
        "best_on_validation": chosen["best_on_validation"],
        "margin": chosen["margin"],
        "candidates": sorted(chosen["candidates"]),
        "baselines_non_inferior": chosen["baselines_non_inferior"],
        "best_val_accuracy_mean": summary["best_val_accuracy_mean"],
        "test_accuracy_mean": summary["test_accuracy_mean"],
        "registered_model": params.mlflow.registered_model,
        "version": info["version"],
        "model_uri": info["model_uri"],
    }
    write_json(args.out, record)
    name = params.mlflow.registered_model
    alias = f"models:/{name}@{tracking.CHAMPION}"
    print(
        f"registered {variant} (seed {summary['best_seed']}) as {name} v{info['version']}, alias "
        f"{tracking.CHAMPION}: load it with mlflow.pyfunc.load_model('{alias}')"
    )


def model_card(params, variant: str, summary: dict, evidence: dict, chosen: dict, data: dict, run: dict) -> dict:
    """The registry version's description and tags: what the model is, how good, from what
    (`run`: the registered seed's metrics.json)."""
    seed = summary["best_seed"]
    interval = accuracy_interval(evidence["correct"])
    size = data["image_size"]
    trainable = params.variant(variant).trainable
    description = (
        f"VGG16 with the `{variant}` freezing strategy (trainable: {trainable}), the model of seed {seed} (the best "
        f"validation accuracy of its {len(evidence['seeds'])} seeds). Chosen by the rule: {chosen['rule']}; best on "
        f"validation: {chosen['best_on_validation']}; non-inferiority margin {chosen['margin']:g}. "
        + baseline_note(chosen)
        + f"Test accuracy over seeds {interval.mean:.3f} "
        f"[{interval.low:.3f}, {interval.high:.3f}] (95%, seeds and {evidence['correct'].shape[1]} test images). "
        f"Input: RGB images, uint8 0..255, shape (n, {size}, {size}, 3). Output: `predicted_class` and one "
        "probability column per class."
    )
    tags = {
        "strategy": variant,
        "seed": seed,
        "seeds": len(evidence["seeds"]),
        "val_accuracy_mean": f"{evidence['val_accuracy']:.4f}",
        "test_accuracy_mean": f"{interval.mean:.4f}",
        "test_accuracy_ci95": f"[{interval.low:.4f}, {interval.high:.4f}]",
        "data_source": data["source"],
        "data_sha256": data["data_sha256"],
        "image_size": size,
        "class_names": json.dumps(data["class_names"]),
        "weights": params.variant_weights(variant),
        "trainable": json.dumps(trainable),
        "head_units": run["head_units"],
        "learning_rate": run["learning_rate"],
        "max_epochs": run["max_epochs"],
        "best_epoch": run["best_epoch"],
        "baselines_non_inferior": json.dumps(chosen["baselines_non_inferior"]),
    }
    return {"description": description, "tags": tags}


def baseline_note(chosen: dict) -> str:
    """The model card's warning when a reference baseline is non-inferior to the best network."""
    if not chosen["baselines_non_inferior"]:
        return "No reference baseline is non-inferior to the best network. "
    names = ", ".join(chosen["baselines_non_inferior"])
    return (
        f"On this data training VGG16 does not pay off: {names} is non-inferior to the best network within the "
        f"margin at a fraction of the cost (reports/report.md); this network is registered as the best network "
        "the rule recommends, for users who need one. "
    )


if __name__ == "__main__":
    run_stage(main)
