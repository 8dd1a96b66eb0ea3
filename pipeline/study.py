"""Optuna plumbing for the tune stage: storage, study identity, budget accounting, pruning.

A study is identified by everything its trials depend on (strategy, data, weights, search
space, epochs, the training code, ...) except `n_trials`: changing any of it starts a fresh
study in the same storage, while raising `n_trials` continues the existing one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import keras
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

FAILED_ON_ITS_OWN = "failed_on_its_own"  # user attr: the trial's hyperparameters failed (NaN loss)


def open_storage(storage: str, journal_path: Path):
    """'journal' -> a JournalStorage file (safe for several processes on one machine);
    anything else is an RDB URL (postgresql://..., sqlite:///...) for many machines."""
    if storage == "journal":
        journal_path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(journal_path)))
    return storage


def study_name(variant: str, identity: dict) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{variant}-{digest}"


def load_or_create(storage, name: str, *, seed: int, startup_trials: int, pruner: optuna.pruners.BasePruner):
    """Create the study or join the existing one (`load_if_exists`).

    Optuna does not store the sampler: it is rebuilt on every start, seeded from `seed` plus
    the trials already in the study, so a resumed study does not replay its first draws.
    """
    probe = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    sampler = optuna.samplers.TPESampler(seed=seed + len(probe.trials), n_startup_trials=startup_trials)
    return optuna.load_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner)


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that used up budget: complete, pruned, or failed because of their own
    hyperparameters (NaN loss). Trials interrupted or crashed from outside do not count:
    the next run repeats them."""
    return [
        trial
        for trial in study.get_trials(deepcopy=False)
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (trial.state == TrialState.FAIL and trial.user_attrs.get(FAILED_ON_ITS_OWN))
    ]


def fail_stale_running(study: optuna.Study) -> int:
    """Mark RUNNING trials left behind by a killed process as FAIL; returns how many.

    Only for a coordinator that knows no other worker is running on this study.
    """
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
    return len(stale)


def split_quota(remaining: int, workers: int) -> list[int]:
    """Split `remaining` trials over `workers` as evenly as possible (exact total, no zeros)."""
    workers = max(1, min(workers, remaining))
    return [remaining // workers + (i < remaining % workers) for i in range(workers)] if remaining else []


class PruningCallback(keras.callbacks.Callback):
    """Reports val_accuracy to Optuna after every epoch and stops hopeless trials.

    `epochs_run` counts the epochs the trial actually trained.
    """

    def __init__(self, trial: optuna.Trial):
        super().__init__()
        self.trial = trial
        self.epochs_run = 0

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_run = epoch + 1
        self.trial.report(float((logs or {})["val_accuracy"]), step=epoch + 1)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}")
