"""Stage `register`: log the best strategy's model to MLflow and register it.

Reads every `results/train/<variant>/metrics.json` and `model.keras` (`--train-dir`) and
params.yaml `mlflow`. The best strategy is the one with the highest mean *validation*
accuracy over seeds (test accuracy is for reporting, not for choosing). Writes
`--out` (results/registered.json): the variant, seed, model URI and registered version.

Load the registered model elsewhere with
    import pipeline.model  # registers the in-model VGG16 preprocessing layer
    mlflow.keras.load_model("models:/<mlflow.registered_model>/<version>")
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline import tracking
from pipeline.atomic import ensure_writable, write_json
from pipeline.cli import run_stage
from pipeline.errors import DataError
from pipeline.params import load_params


def best_variant(summaries: dict[str, dict]) -> str:
    """Highest mean validation accuracy; ties go to fewer trainable parameters, then the name."""
    if not summaries:
        raise DataError("no results/train/<variant>/metrics.json found; run the train stages first")
    return max(
        summaries,
        key=lambda v: (summaries[v]["best_val_accuracy_mean"], -summaries[v]["params_trainable"], v),
    )


def read_summaries(train_dir: Path, variants: list[str]) -> dict[str, dict]:
    summaries = {}
    for variant in variants:
        path = train_dir / variant / "metrics.json"
        if not path.is_file():
            raise DataError(f"{path} not found; run `dvc repro train@{variant}` first")
        summaries[variant] = json.loads(path.read_text())
    return summaries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--train-dir", type=Path, default=Path("results/train"))
    parser.add_argument("--out", type=Path, default=Path("results/registered.json"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    ensure_writable(args.out.parent, "--out")
    summaries = read_summaries(args.train_dir, list(params.variants))
    variant = best_variant(summaries)
    summary = summaries[variant]

    uri = tracking.resolve_tracking_uri(params.mlflow.tracking_uri, Path(args.params).resolve().parent)
    tracking.connect(uri, params.mlflow.experiment)
    import keras

    import pipeline.model  # noqa: F401  registers VGG16Preprocess before loading

    model = keras.models.load_model(args.train_dir / variant / "model.keras", safe_mode=True)
    tags = {"stage": "register", "variant": variant, "seed": summary["best_seed"], **tracking.environment_tags()}
    with tracking.run(f"register/{variant}", tags=tags, params={"selection": "highest mean validation accuracy"}):
        tracking.log_metrics({k: v for k, v in summary.items() if k != "seeds"})
        info = tracking.log_keras_model(model, params.mlflow.registered_model)
    record = {
        "variant": variant,
        "seed": summary["best_seed"],
        "selection": "highest mean validation accuracy over seeds",
        "best_val_accuracy_mean": summary["best_val_accuracy_mean"],
        "test_accuracy_mean": summary["test_accuracy_mean"],
        "registered_model": params.mlflow.registered_model,
        "version": info["version"],
        "model_uri": info["model_uri"],
    }
    write_json(args.out, record)
    print(f"registered {variant} (seed {summary['best_seed']}) as {params.mlflow.registered_model} v{info['version']}")


if __name__ == "__main__":
    run_stage(main)
