"""Stage `register`: log the best strategy's model to MLflow and register it.

Reads every `results/train/<variant>/` (`--train-dir`: metrics, per-image test predictions,
model.keras), the tune records (`--tune-dir`, for the compute account) and params.yaml
`mlflow`. The strategy registered is the report's answer (`pipeline.answer`): the best on
*validation*, or the cheapest strategy whose test accuracy is statistically indistinguishable
from it. Writes `--out` (results/registered.json): the variant, seed, model URI and version.

Load the registered model elsewhere with
    import pipeline.model  # registers the in-model VGG16 preprocessing layer
    mlflow.keras.load_model("models:/<mlflow.registered_model>/<version>")
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline import tracking
from pipeline.answer import choose, read_evidence
from pipeline.atomic import ensure_writable, write_json
from pipeline.cli import run_stage
from pipeline.errors import DataError
from pipeline.params import load_params


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
    parser.add_argument("--tune-dir", type=Path, default=Path("results/tune"))
    parser.add_argument("--out", type=Path, default=Path("results/registered.json"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    ensure_writable(args.out.parent, "--out")
    summaries = read_summaries(args.train_dir, list(params.variants))
    chosen = choose({v: read_evidence(args.train_dir, args.tune_dir, v) for v in params.variants})
    variant = chosen["recommended"]
    summary = summaries[variant]

    uri = tracking.resolve_tracking_uri(params.mlflow.tracking_uri, Path(args.params).resolve().parent)
    tracking.connect(uri, params.mlflow.experiment)
    import keras

    import pipeline.model  # noqa: F401  registers VGG16Preprocess before loading

    model = keras.models.load_model(args.train_dir / variant / "model.keras", safe_mode=True)
    tags = {"stage": "register", "variant": variant, "seed": summary["best_seed"], **tracking.environment_tags()}
    selection = {"selection": chosen["rule"], "best_on_validation": chosen["best_on_validation"]}
    with tracking.run(f"register/{variant}", tags=tags, params=selection):
        tracking.log_metrics({f"registered/{k}": v for k, v in summary.items() if k != "seeds"})
        info = tracking.log_keras_model(model, params.mlflow.registered_model)
    record = {
        "variant": variant,
        "seed": summary["best_seed"],
        "selection": chosen["rule"],
        "best_on_validation": chosen["best_on_validation"],
        "indistinguishable_from_best": chosen["indistinguishable_from_best"],
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
