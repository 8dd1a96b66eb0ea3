"""The tune stage's files, computed from a finished study: best_params.json, trials.csv (their
format: pipeline/results.py), figures/."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from pipeline import optuna_study, results
from pipeline.atomic import atomic_dir
from pipeline.errors import PipelineError
from pipeline.params import Params

EDGE_SHARE = 0.1  # a learning rate within this share of the log range from an end is "at the edge"


def trial_rows(trials: list[optuna.trial.FrozenTrial]) -> list[dict]:
    """One row per counted trial in budget order (`trial` = its place in the budget, the same in a
    resumed study as in an uninterrupted one; Optuna's own numbers also count interrupted attempts)."""
    rows = []
    for trial in sorted(trials, key=_budget_index):
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else None
        rows.append(
            {
                "trial": _budget_index(trial),
                "state": trial.state.name,
                "value": trial.value,
                "head_units": trial.params.get("head_units"),
                "learning_rate": trial.params.get("learning_rate"),
                "best_epoch": trial.user_attrs.get("best_epoch"),
                "epochs_run": trial.user_attrs.get("epochs_run"),
                "train_seconds": trial.user_attrs.get("train_seconds"),
                "seconds": seconds,
            }
        )
    return rows


def _budget_index(trial: optuna.trial.FrozenTrial) -> int:
    return trial.user_attrs.get("budget_index", trial.number)


def learning_rate_edge(learning_rate: float, search: tuple[float, float]) -> str | None:
    """ "low" / "high" when `learning_rate` lies within EDGE_SHARE of the log range from that end
    (the optimum may lie outside the range: widen tune.learning_rate), else None."""
    low, high = np.log(search[0]), np.log(search[1])
    position = (np.log(learning_rate) - low) / (high - low)
    return "low" if position < EDGE_SHARE else "high" if position > 1 - EDGE_SHARE else None


def best_params(trials: list[optuna.trial.FrozenTrial], params: Params, variant: str, study_name: str) -> dict:
    """The best complete trial plus the budget and search space (the fairness record)."""
    tune, train = params.tune, params.train
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise PipelineError(
            f"tune@{variant}: none of {len(trials)} trials completed (all failed with a non-finite loss); "
            "lower the top of tune.learning_rate or check the data"
        )
    best = max(complete, key=lambda t: (t.value, -_budget_index(t)))  # earliest trial wins ties
    return {
        "variant": variant,
        "head_units": best.params["head_units"],
        "learning_rate": best.params["learning_rate"],
        "value": best.value,
        "objective": "validation accuracy of the kept epoch under the training rule",
        "trial": _budget_index(best),
        "best_epoch": best.user_attrs.get("best_epoch"),
        "study": study_name,
        "learning_rate_at_edge": learning_rate_edge(best.params["learning_rate"], tune.learning_rate),
        "budget": {
            "n_trials": params.tune_trials(variant),
            "trials_run": len(trials),
            "complete_trials": len(complete),
            "failed_trials": sum(t.state == TrialState.FAIL for t in trials),
            "epochs_run": sum(t.user_attrs.get("epochs_run") or 0 for t in trials),
            "startup_trials": tune.startup_trials,
            "trains_end_to_end": params.trains_end_to_end(variant),
            "rule": {"max_epochs": train.max_epochs, "patience": train.patience, "min_delta": train.min_delta},
        },
        "search_space": {"head_units": list(tune.head_units), "learning_rate": list(tune.learning_rate)},
    }


def write_outputs(study: optuna.Study, out: Path, params: Params, variant: str) -> dict:
    """Write best_params.json, trials.csv and figures/ for the study's counted trials."""
    trials = optuna_study.finished_trials(study)
    best = best_params(trials, params, variant, study.study_name)
    with atomic_dir(out / "figures") as figures:
        best["figures"] = _draw_figures(study, trials, figures, variant)
    results.write_tuning(out, best, trial_rows(trials))
    return best


def _draw_figures(study: optuna.Study, trials, folder: Path, variant: str) -> dict[str, str]:
    """PNG per figure; a figure that needs more completed trials is listed with the reason."""
    from optuna.visualization import matplotlib as optuna_plots

    from pipeline.plotting import plt

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
