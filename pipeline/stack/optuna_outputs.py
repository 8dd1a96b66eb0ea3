"""The tune stage's files, computed from a finished study: best_params.json, trials.csv (their
format: pipeline/core/results.py), figures/."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from pipeline.core import results, stats
from pipeline.core.params import Params
from pipeline.runtime.atomic import atomic_dir
from pipeline.runtime.errors import PipelineError
from pipeline.stack import optuna_study

EDGE_SHARE = 0.1  # a learning rate within this share of the log range from an end is "at the edge"


def trial_rows(trials: list[optuna.trial.FrozenTrial], halving_epoch: int) -> list[dict]:
    """One row per counted trial in budget order (`trial` = its place in the budget, the same in a
    resumed study as in an uninterrupted one; Optuna's own numbers also count interrupted attempts).
    `rung_value`: the best validation accuracy up to `halving_epoch`, for trials that reached it."""
    rows = []
    for trial in sorted(trials, key=_budget_index):
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else None
        rows.append(
            {
                "trial": _budget_index(trial),
                "state": trial.state.name,
                "value": trial.value,
                "rung_value": trial.intermediate_values.get(halving_epoch) if halving_epoch else None,
                "head_units": trial.params.get("head_units"),
                "learning_rate": trial.params.get("learning_rate"),
                "best_epoch": trial.user_attrs.get("best_epoch"),
                "epochs_run": trial.user_attrs.get("epochs_run"),
                "stopped_early": trial.user_attrs.get("stopped_early"),
                "train_seconds": trial.user_attrs.get("train_seconds"),
                "seconds": seconds,
            }
        )
    return rows


def _budget_index(trial: optuna.trial.FrozenTrial) -> int:
    return trial.user_attrs.get("budget_index", trial.number)


def learning_rate_edge(learning_rate: float, search: tuple[float, float]) -> str | None:
    """ "low" / "high" when `learning_rate` lies within EDGE_SHARE of the log range from that end
    (the optimum may lie outside the range: widen it), else None."""
    low, high = np.log(search[0]), np.log(search[1])
    position = (np.log(learning_rate) - low) / (high - low)
    return "low" if position < EDGE_SHARE else "high" if position > 1 - EDGE_SHARE else None


def curve_value(trial: optuna.trial.FrozenTrial) -> float:
    """A trial's value on the tuning curve: its value when complete; when cut by halving, the best
    validation accuracy it had reached by the rung (an approximation: a complete trial's value is
    its kept epoch's accuracy); 0.0 for a trial that failed on its own (a non-finite loss)."""
    if trial.state == TrialState.COMPLETE:
        return float(trial.value)
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        return float(trial.intermediate_values[trial.last_step])
    return 0.0


def hit_cap(trial: optuna.trial.FrozenTrial, max_epochs: int) -> bool:
    """A complete trial that used every epoch without patience running out: still improving."""
    return (
        trial.state == TrialState.COMPLETE
        and not trial.user_attrs.get("stopped_early")
        and ((trial.user_attrs.get("epochs_run") or 0) >= max_epochs)
    )


def best_params(
    trials: list[optuna.trial.FrozenTrial], params: Params, variant: str, study_name: str, val_images: int
) -> dict:
    """The best complete trial plus the budget, the search space (the fairness record) and the
    tuning curve (expected best validation accuracy against the number of trials)."""
    tune, train = params.tune, params.train
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise PipelineError(
            f"tune@{variant}: none of {len(trials)} trials completed (all failed with a non-finite loss); "
            f"lower the top of {params.learning_rate_key(variant)} or check the data"
        )
    best = max(complete, key=lambda t: (t.value, -_budget_index(t)))  # earliest trial wins ties
    search = params.learning_rate_range(variant)
    curve = stats.tuning_curve([curve_value(t) for t in sorted(trials, key=_budget_index)])
    one_image = 1.0 / val_images
    return {
        "variant": variant,
        "head_units": best.params["head_units"],
        "learning_rate": best.params["learning_rate"],
        "value": best.value,
        "objective": "validation accuracy of the kept epoch under the training rule",
        "trial": _budget_index(best),
        "best_epoch": best.user_attrs.get("best_epoch"),
        "study": study_name,
        "learning_rate_at_edge": learning_rate_edge(best.params["learning_rate"], search),
        "validation": {
            "images": val_images,
            "standard_error": stats.accuracy_standard_error(best.value, val_images),
        },
        "budget": {
            "n_trials": tune.n_trials,
            "trials_run": len(trials),
            "complete_trials": len(complete),
            "pruned_trials": sum(t.state == TrialState.PRUNED for t in trials),
            "failed_trials": sum(t.state == TrialState.FAIL for t in trials),
            "capped_trials": sum(hit_cap(t, train.max_epochs) for t in trials),
            "epochs_run": sum(t.user_attrs.get("epochs_run") or 0 for t in trials),
            "startup_trials": tune.startup_trials,
            "design_seed": tune.design_seed,
            "halving": {"epoch": params.halving_epoch(variant), "factor": tune.halving_factor},
            "trains_end_to_end": params.trains_end_to_end(variant),
            "rule": {"max_epochs": train.max_epochs, "patience": train.patience, "min_delta": train.min_delta},
        },
        "search_space": {"head_units": list(tune.head_units), "learning_rate": list(search)},
        "tuning_curve": {
            "expected_best": curve.expected,
            "std": curve.std,
            "last_gain": curve.last_gain,
            # the last trial is expected to add more than one validation image: more tuning may pay
            "still_rising": curve.last_gain > one_image,
        },
    }


def write_outputs(study: optuna.Study, out: Path, params: Params, variant: str, val_images: int) -> dict:
    """Write best_params.json, trials.csv and figures/ for the study's counted trials."""
    trials = optuna_study.finished_trials(study)
    best = best_params(trials, params, variant, study.study_name, val_images)
    with atomic_dir(out / "figures") as figures:
        best["figures"] = _draw_figures(study, trials, figures, variant)
    results.write_tuning(out, best, trial_rows(trials, params.halving_epoch(variant)))
    return best


def _draw_figures(study: optuna.Study, trials, folder: Path, variant: str) -> dict[str, str]:
    """PNG per figure; a figure that needs more completed trials is listed with the reason."""
    from optuna.visualization import matplotlib as optuna_plots

    from pipeline.core.plotting import plt

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
