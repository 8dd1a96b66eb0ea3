"""Stage `report`: the comparison a reviewer reads, as Markdown and self-contained HTML.

Reads params.yaml, data/prepared/summary.json, results/tune/<variant>/{best_params.json,
trials.csv}, results/train/<variant>/seeds/<seed>/{history.csv,metrics.json,
confusion_matrix.csv,test_predictions.csv}, results/baselines/, the predict stage's
results/predict/scores.json and the studies' results under results/studies/ where they exist (the
parameter-efficient study's strategies read beside the main ones: `parameter_efficient.py`); never
builds a network. Writes `--out` (reports/):
  report.md, report.html   tables, figures, caveats (HTML: images embedded, no scripts)
  figures/*.png            convergence, train vs val, test accuracy, parameters, tuning, ...
  summary.json             per strategy test accuracy with its interval, `baselines`, `answer`, `data_conversions`
  metrics.json             the DVC metric: per strategy test accuracy and interval, the baselines (numbers only);
                           the parameter-efficient study's strategies too when it ran
and logs them as the artifacts of one MLflow run `report`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.analysis.recommendation import choose, read_inputs
from pipeline.core.data import load_summary
from pipeline.core.params import RESERVED_NAMES, Params, load_params
from pipeline.core.plotting import confusion_matrix_figure, plt
from pipeline.core.results import (
    ANSWER_SECTION,
    BASELINES_SECTION,
    CONVERSIONS_SECTION,
    PIXELS,
    PROBE,
    read_baselines,
    read_cut_probes,
    read_strategy,
    read_tuning,
)
from pipeline.core.stats import accuracy_interval
from pipeline.runtime.atomic import atomic_dir, atomic_path, ensure_writable, write_json, write_text
from pipeline.runtime.cli import run_stage
from pipeline.stack import tracking
from pipeline.stages.report import cuts, diagnostics, figures, parameter_efficient, pareto, studies
from pipeline.stages.report.answer import unconverged
from pipeline.stages.report.document import build_document, to_html, to_markdown
from pipeline.stages.report.predictions import read_predictions


def read_results(train_dir: Path, variant: str, evidence: dict) -> dict:
    """`results.read_strategy` plus the answer's `evidence` (per-image correctness, cost) and the test
    accuracy interval over seeds and test images."""
    result = read_strategy(train_dir, variant)
    result["evidence"] = evidence
    result["interval"] = accuracy_interval(evidence["correct"])
    return result


def summary_metrics(results: dict, tuning: dict, baselines: dict, answer: dict, data: dict) -> dict:
    """summary.json: per strategy its test accuracy with the 95% interval over seeds
    and test images, then `baselines`, the `answer`, and `data_conversions` (how many prepared
    images needed each kind of decoding beyond plain 8-bit RGB; only kinds that occurred).
    Deterministic (costs are FLOPs; measured seconds stay in the report's table)."""
    out = {}
    for variant, result in results.items():
        interval = result["interval"]
        tune = tuning.get(variant)
        out[variant] = {
            "test_accuracy_mean": interval.mean,
            "test_accuracy_ci95_low": interval.low,
            "test_accuracy_ci95_high": interval.high,
            "test_macro_f1_mean": float(np.mean(list(result["macro_f1"].values()))),
            "best_val_accuracy_mean": result["evidence"]["val_accuracy"],
            "seeds": interval.n,
            "test_images": int(result["evidence"]["correct"].shape[1]),
            "params_trainable": result["parameters"]["trainable"],
            "unconverged_seeds": unconverged(result),
            "learning_rate": result["learning_rate"],
            "learning_rate_at_edge": tune["best"].get("learning_rate_at_edge") if tune else None,
            "tuning": _tuning_summary(tune["best"]) if tune else None,
        }
    out[BASELINES_SECTION] = {
        name: {k: b[k] for k in ("test_accuracy", "test_macro_f1", "val_accuracy", "C")}
        for name, b in baselines.items()
    }
    out[ANSWER_SECTION] = answer  # deterministic: FLOPs, never seconds
    out[CONVERSIONS_SECTION] = {kind: n for kind, n in data.get("conversions", {}).items() if n}
    return out


def _tuning_summary(best: dict) -> dict:
    """The tuning record a reviewer checks: budget spent, trials cut or capped, the chosen trial's
    validation standard error, and whether the tuning curve is still rising at the budget."""
    budget, curve = best["budget"], best["tuning_curve"]
    return {
        "trials": budget["trials_run"],
        "complete_trials": budget["complete_trials"],
        "pruned_trials": budget["pruned_trials"],
        "capped_trials": budget["capped_trials"],
        "epochs_run": budget["epochs_run"],
        "best_val_accuracy": best["value"],
        "val_standard_error": best["validation"]["standard_error"],
        "expected_best_curve": curve["expected_best"],
        "still_rising": curve["still_rising"],
    }


def compared_metrics(summary: dict, beyond: dict | None = None) -> dict:
    """reports/metrics.json, the one DVC metrics file: per strategy the test accuracy and its 95%
    interval, the two baselines' test accuracy, and, when the parameter-efficient study ran, each
    of its strategies like a main one (`beyond`, `parameter_efficient.read`; their names never
    clash with the main strategies', params validation); numbers only, one row in `dvc exp show`."""
    out = {
        variant: {
            "test_acc": s["test_accuracy_mean"],
            "ci_low": s["test_accuracy_ci95_low"],
            "ci_high": s["test_accuracy_ci95_high"],
        }
        for variant, s in summary.items()
        if variant not in RESERVED_NAMES
    }
    short = {PIXELS: "pixels_lr", PROBE: "linear_probe"}
    out.update({short.get(name, name): b["test_accuracy"] for name, b in summary["baselines"].items()})
    for name, result in (beyond or {}).items():
        interval = result["interval"]
        out[name] = {"test_acc": interval.mean, "ci_low": interval.low, "ci_high": interval.high}
    return out


def draw_figures(
    results: dict,
    tuning: dict,
    class_names: list[str],
    folder: Path,
    study_results: dict | None = None,
    baselines: dict | None = None,
    recommended: str | None = None,
    probes: dict | None = None,
    beyond: dict | None = None,
) -> dict[str, str]:
    """Write every figure as PNG into `folder` (the studies' ones where their results exist);
    returns {figure id: file name}. `confusion_best` shows the `recommended` strategy (default:
    the highest mean test accuracy); `probes` are the baselines stage's probes per cut point;
    `beyond` the parameter-efficient study's strategies (`parameter_efficient.read`)."""
    palette = figures.colours(list(results))
    references = {name: b["test_accuracy"] for name, b in (baselines or {}).items()}
    shown = recommended or max(results, key=lambda v: results[v]["interval"].mean)
    why = "the recommended strategy" if recommended else "highest mean test accuracy"
    drawings = {
        "convergence_epochs": lambda: figures.convergence(results, palette, "epoch", "epoch"),
        "convergence_seconds": lambda: figures.convergence(
            results, palette, "cumulative_seconds", "training wall-clock time (s)"
        ),
        "train_vs_val": lambda: figures.train_vs_val(results, palette),
        "test_accuracy": lambda: figures.test_accuracy(results, palette, references),
        "pareto": lambda: pareto.figure(results, palette, references),
        "parameters": lambda: figures.parameter_counts(results, palette),
        "confusion_best": lambda: confusion_matrix_figure(
            results[shown]["confusion"], class_names, f"{shown} ({why}): test set, all seeds"
        ),
    }
    tuned = {v: t for v, t in tuning.items() if t is not None}
    if tuned:
        drawings["tuning"] = lambda: figures.tuning_history(tuned, palette)
        drawings["tuning_curves"] = lambda: figures.tuning_curves(tuned, palette)
    if len(cuts.cut_points(results)) > 1:
        drawings["accuracy_vs_cut"] = lambda: cuts.accuracy_vs_cut(results, palette, references, probes)
    drawings.update(diagnostics.draw(results, palette))
    drawings.update(studies.draw(study_results or {}, palette))
    drawings.update(parameter_efficient.draw(results, beyond or {}, references))
    for variant, result in results.items():
        drawings[f"confusion_{variant}"] = lambda v=variant, r=result: confusion_matrix_figure(
            r["confusion"], class_names, f"{v}: test set, all seeds"
        )
    files = {}
    for name, draw in drawings.items():
        figure = draw()
        figure.savefig(folder / f"{name}.png", dpi=90, bbox_inches="tight")
        plt.close(figure)
        files[name] = f"{name}.png"
    return files


def _thumbnail(source: Path, target: Path, width: int = 720) -> None:
    """A small PNG copy (for the README), written atomically."""
    from PIL import Image

    with Image.open(source) as image:
        small = image.convert("RGB").resize(
            (width, round(image.height * width / image.width)), Image.Resampling.LANCZOS
        )
        with atomic_path(target) as tmp:
            small.save(tmp, format="PNG", optimize=True)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", required=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--train-dir", type=Path, required=True)
    parser.add_argument("--tune-dir", type=Path, required=True)
    parser.add_argument(
        "--baselines-dir",
        type=Path,
        required=True,
        help="the baselines stage's results (reference rows when they exist)",
    )
    parser.add_argument(
        "--studies-dir",
        type=Path,
        help="the studies' results (sections appear for those that exist; none without it)",
    )
    parser.add_argument(
        "--predict-dir",
        type=Path,
        help="the predict stage's results/predict (the section on the cheap predictors appears when given)",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--thumbnail", type=Path, help="also write a small copy of the convergence figure here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    params: Params = load_params(args.params)
    ensure_writable(args.out, "--out")
    if args.thumbnail:
        ensure_writable(args.thumbnail.parent, "--thumbnail")
    data_summary = load_summary(args.prepared)
    baselines = read_baselines(args.baselines_dir)
    evidence, baseline_evidence = read_inputs(params, data_summary, args.train_dir, args.tune_dir, baselines)
    results = {v: read_results(args.train_dir, v, evidence[v]) for v in params.variants}
    tuning = {v: read_tuning(args.tune_dir, v) for v in params.variants}
    answer = choose(evidence, params.report.margin, baseline_evidence)
    study_results, beyond = {}, {}
    if args.studies_dir is not None:
        study_results = studies.read_studies(args.studies_dir, params, baselines, data_summary)
        beyond = parameter_efficient.read(args.studies_dir, params, data_summary)
    tracking.open_store(params.mlflow, args.params)

    # reports/ may hold other files (a benchmark): replace only this stage's outputs
    with tracking.run("report", tags={"stage": "report", **tracking.environment_tags()}):
        probes = read_cut_probes(args.baselines_dir)
        with atomic_dir(args.out / "figures") as figure_dir:
            files = draw_figures(
                results,
                tuning,
                data_summary["class_names"],
                figure_dir,
                study_results,
                baselines,
                answer["recommended_network"],
                probes,
                beyond,
            )
            predicted = read_predictions(args.predict_dir) if args.predict_dir else None
            document = build_document(
                params,
                data_summary,
                results,
                tuning,
                files,
                study_results,
                baselines,
                answer,
                probes,
                predicted,
                beyond,
            )
            html = to_html(document, figure_dir)
        write_text(args.out / "report.md", to_markdown(document, "figures"))
        write_text(args.out / "report.html", html)
        summary = summary_metrics(results, tuning, baselines, answer, data_summary)
        write_json(args.out / "summary.json", summary)
        write_json(args.out / "metrics.json", compared_metrics(summary, beyond))
        if args.thumbnail:
            _thumbnail(args.out / "figures" / files["convergence_epochs"], args.thumbnail)
        written = ("report.md", "report.html", "summary.json", "metrics.json")
        tracking.log_artifacts([args.out / name for name in written])
        tracking.log_artifacts(sorted((args.out / "figures").glob("*.png")), folder="figures")
    ran = studies.ran(study_results) + (["parameter_efficient"] if beyond else [])
    print(
        f"report: {args.out / 'report.html'} ({len(files)} figures, {len(results)} strategies"
        + (f", studies: {', '.join(ran)}" if ran else "")
        + ")"
    )


if __name__ == "__main__":
    run_stage(main)
