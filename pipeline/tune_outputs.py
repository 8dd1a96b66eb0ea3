"""The tune stage's files, computed from a finished study: best_params.json, trials.csv, figures/."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pipeline import study as studies
from pipeline.atomic import atomic_dir, write_json, write_text
from pipeline.errors import PipelineError
from pipeline.params import TuneParams

TRIAL_COLUMNS = ("number", "state", "value", "head_units", "learning_rate", "epochs_run", "seconds")


def trial_rows(trials: list[optuna.trial.FrozenTrial]) -> list[dict]:
    rows = []
    for trial in sorted(trials, key=lambda t: t.number):
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else None
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "value": trial.value,
                "head_units": trial.params.get("head_units"),
                "learning_rate": trial.params.get("learning_rate"),
                "epochs_run": trial.user_attrs.get("epochs_run"),
                "seconds": seconds,
            }
        )
    return rows


def best_params(trials: list[optuna.trial.FrozenTrial], tune: TuneParams, variant: str, study_name: str) -> dict:
    """The best complete trial plus the budget and pruning statistics (the fairness record)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise PipelineError(
            f"tune@{variant}: none of {len(trials)} trials completed (all pruned or failed); widen "
            "tune.learning_rate, raise tune.pruner_startup_trials, or check the data"
        )
    best = max(complete, key=lambda t: (t.value, -t.number))  # earliest trial wins ties
    epochs_run = sum(t.user_attrs.get("epochs_run") or 0 for t in trials)
    budget = len(trials) * tune.epochs
    return {
        "variant": variant,
        "head_units": best.params["head_units"],
        "learning_rate": best.params["learning_rate"],
        "value": best.value,
        "objective": "best validation accuracy within tune.epochs epochs",
        "trial": best.number,
        "study": study_name,
        "budget": {"n_trials": tune.n_trials, "epochs_per_trial": tune.epochs, "rule": "the same for every strategy"},
        "search_space": {"head_units": list(tune.head_units), "learning_rate": list(tune.learning_rate)},
        "pruning": {
            "trials": len(trials),
            "complete_trials": len(complete),
            "pruned_trials": sum(t.state == TrialState.PRUNED for t in trials),
            "failed_trials": sum(t.state == TrialState.FAIL for t in trials),
            "epochs_run": epochs_run,
            "epochs_saved": budget - epochs_run,
            "epochs_saved_share": (budget - epochs_run) / budget if budget else 0.0,
        },
    }


def write_outputs(study: optuna.Study, out: Path, tune: TuneParams, variant: str) -> dict:
    """Write best_params.json, trials.csv and figures/ for the study's counted trials."""
    trials = studies.finished_trials(study)
    best = best_params(trials, tune, variant, study.study_name)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TRIAL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(trial_rows(trials))
    with atomic_dir(out / "figures") as figures:
        best["figures"] = _draw_figures(study, trials, figures, variant)
    write_text(out / "trials.csv", buffer.getvalue())
    write_json(out / "best_params.json", best)
    return best


def _draw_figures(study: optuna.Study, trials, folder: Path, variant: str) -> dict[str, str]:
    """PNG per figure; a figure that needs more completed trials is listed with the reason."""
    from optuna.visualization import matplotlib as optuna_plots

    from pipeline.figures import plt

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    figures = {
        "optimization_history": (1, lambda: optuna_plots.plot_optimization_history(study)),
        "param_importances": (2, lambda: optuna_plots.plot_param_importances(study)),
        "contour": (2, lambda: optuna_plots.plot_contour(study, params=["head_units", "learning_rate"])),
    }
    drawn = {}
    for name, (needed, draw) in figures.items():
        if len(complete) < needed:
            drawn[name] = f"skipped: needs {needed} completed trials, has {len(complete)}"
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            axes = draw()
        axes = axes.flat[0] if hasattr(axes, "flat") else axes
        axes.figure.suptitle(f"tune@{variant}: {name.replace('_', ' ')}")
        axes.figure.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(axes.figure)
        drawn[name] = f"figures/{name}.png"
    return drawn
