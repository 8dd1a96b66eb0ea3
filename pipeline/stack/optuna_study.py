"""Optuna plumbing for the tune stage: storage, study identity, the sampler, budget accounting.

A study is identified by everything its trials depend on (strategy, data, weights, search
space, epochs, the training code, ...) except `n_trials`: changing any of it starts a fresh
study in the same storage, while raising `n_trials` continues the existing one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import optuna
import sqlalchemy
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from pipeline.runtime.errors import PipelineError

FAILED_ON_ITS_OWN = "failed_on_its_own"  # user attr: the trial's hyperparameters failed (NaN loss)
BUDGET_INDEX = "budget_index"  # user attr: the trial's place in the budget (see BudgetSampler)
OVER_BUDGET = "over_budget"  # user attr: started after other workers had used the budget; never trained
STALE_AFTER_HEARTBEATS = 4  # RDB storage: a trial whose worker was silent this many heartbeats is failed


class OverBudget(Exception):
    """A worker asked for a trial just after the others had taken the last places in the budget."""


def open_storage(storage: str, journal_path: Path, heartbeat_seconds: int):
    """'journal' -> a JournalStorage file (several processes on one machine, no heartbeat: the
    coordinator knows every worker); anything else is an RDB URL (postgresql://..., sqlite:///...)
    for many machines, with a heartbeat: the trial of a worker that stops (killed, crashed, its
    machine lost) is failed after STALE_AFTER_HEARTBEATS silent heartbeats and rerun by another."""
    if storage == "journal":
        journal_path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(journal_path)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat: stable since 2.9
            return optuna.storages.RDBStorage(
                storage,
                engine_kwargs={"pool_pre_ping": True},  # a connection the server dropped is replaced, not an error
                heartbeat_interval=heartbeat_seconds,
                grace_period=STALE_AFTER_HEARTBEATS * heartbeat_seconds,
            )
    except sqlalchemy.exc.SQLAlchemyError as error:  # refused, unknown host or database, wrong password
        reason = " ".join(str(getattr(error, "orig", None) or error).split())
        raise PipelineError(
            f"tune.storage {storage}: cannot open the study database ({reason}); start the server "
            "(`make team-up` for the local team stack), check host, port and database name in the URL, "
            "and give the password in the environment (PGPASSWORD or PGPASSFILE)"
        ) from None


def snapshot_to_journal(study: optuna.Study, journal_path: Path) -> None:
    """Database storage: copy the finished study into `journal_path` (a JournalStorage file,
    replaced whole): the tune stage's DVC output, so the study travels with `dvc push` and opens
    in optuna-dashboard like a local one."""
    partial = journal_path.with_name(journal_path.name + ".partial")
    partial.unlink(missing_ok=True)
    optuna.copy_study(
        from_study_name=study.study_name,
        from_storage=study._storage,
        to_storage=JournalStorage(JournalFileBackend(str(partial))),
    )
    os.replace(partial, journal_path)


def has_heartbeat(study: optuna.Study) -> bool:
    """Whether the study's storage records heartbeats (an RDB storage made by `open_storage`)."""
    return getattr(study._storage, "get_heartbeat_interval", lambda: None)() is not None


def fail_stale(study: optuna.Study) -> int:
    """RDB storage: fail the RUNNING trials whose worker stopped sending heartbeats, so that their
    places in the budget are free again; returns how many. Journal storage: nothing (0)."""
    if not has_heartbeat(study):
        return 0
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return len(before - {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))})


def study_name(variant: str, identity: dict) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{variant}-{digest}"


def load_or_create(
    storage, name: str, *, sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner
) -> optuna.Study:
    """Create the study or join the existing one (`load_if_exists`). Optuna stores neither the
    sampler nor the pruner: every process passes them again."""
    return optuna.create_study(
        storage=storage, study_name=name, direction="maximize", load_if_exists=True, sampler=sampler, pruner=pruner
    )


class HalvingPruner(optuna.pruners.BasePruner):
    """Successive halving with one rung, inside one strategy's study: at epoch `rung` a trial
    continues only when its reported value (the best validation accuracy so far) ranks in the
    top ceil(n / `factor`) of the n trials that reached the rung, itself included. Ties keep the
    trial. Trials that stop early before the rung are never cut. `rung` 0: no pruning.

    The decision depends only on the trials before it in the study, so a sequential study (and a
    resumed one) cuts the same trials. Keep one study per strategy: a cheap strategy's early
    epochs must not cut an expensive one's (Optuna's own halving pruners compare the study's
    trials at a rung in the same way).
    """

    def __init__(self, rung: int, factor: int):
        self.rung, self.factor = rung, factor

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if not self.rung or trial.last_step != self.rung:
            return False
        others = [
            t.intermediate_values[self.rung]
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if self.rung in t.intermediate_values and t.number != trial.number
        ]
        return halving_cuts(trial.intermediate_values[self.rung], others, self.factor)


def halving_cuts(value: float, others: list[float], factor: int) -> bool:
    """True when `value` is outside the top ceil(n / factor) of `others` plus itself (n values)."""
    kept = -(-(len(others) + 1) // factor)
    return sum(other > value for other in others) >= kept


GOLDEN = (5**0.5 - 1) / 2


def design(seed: int, variant: str, head_units: list[int], learning_rate: tuple[float, float], n: int) -> list[dict]:
    """`n` space-filling start-up points: learning rates at positions u0 + k*0.618 (mod 1) of the
    log range (a golden-ratio sequence: every prefix of k points leaves no gap wider than 1.81/k of
    the range, so a short budget covers it as well as a long one), head sizes in turn. The offset
    u0 and the first head size are drawn from (seed, variant), `seed` being `tune.design_seed`:
    strategies start from different points; the first k points do not depend on `n`."""
    rng = np.random.default_rng([seed, zlib.crc32(variant.encode())])
    start, first_unit = rng.uniform(), int(rng.integers(len(head_units)))
    low, high = np.log(learning_rate[0]), np.log(learning_rate[1])
    return [
        {
            "head_units": head_units[(first_unit + k) % len(head_units)],
            "learning_rate": float(np.exp(low + ((start + k * GOLDEN) % 1.0) * (high - low))),
        }
        for k in range(n)
    ]


class BudgetSampler(optuna.samplers.BaseSampler):
    """Trial k of the budget gets design point k while k < len(design), else a TPE draw seeded by
    (seed, k). k is the trial's place in the budget: the smallest place not held by a finished or
    running trial (stored as the user attr `budget_index` the moment it is taken).

    So a trial's parameters depend only on the seed and the results before it: after an interrupt,
    the trial that was cut off is drawn again with its own parameters, and a resumed study ends with
    the same trials as an uninterrupted one (a re-created seeded TPESampler would restart its random
    stream and replay other draws). With several workers, trials started at the same moment get
    different places (see `budget_place`), and the place of a failed worker's trial is taken again.
    """

    def __init__(self, seed: int, design_points: list[dict]):
        self.seed, self.design = seed, design_points
        self.budget_index: dict[int, int] = {}  # trial number -> k, for the trials of this process
        self._tpe: optuna.samplers.TPESampler | None = None

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        k = budget_place(study.get_trials(deepcopy=False), trial.number)
        study._storage.set_trial_user_attr(trial._trial_id, BUDGET_INDEX, k)  # visible to the other workers now
        self.budget_index[trial.number] = k
        self._tpe = optuna.samplers.TPESampler(seed=self.seed * 100_003 + k, n_startup_trials=len(self.design))

    def _in_design(self, trial) -> bool:
        return self.budget_index[trial.number] < len(self.design)

    def infer_relative_search_space(self, study, trial):
        return {} if self._in_design(trial) else self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return {} if self._in_design(trial) else self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        if self._in_design(trial):
            return self.design[self.budget_index[trial.number]][param_name]
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        if self._tpe is not None:
            self._tpe.after_trial(study, trial, state, values)


def budget_place(trials: list[optuna.trial.FrozenTrial], number: int) -> int:
    """The budget place of trial `number` (RUNNING, just created): the places held by finished
    trials and by running trials that already took one are out; the running trials still without
    a place take the free ones in order of their trial numbers. Every worker computes the same
    answer whichever of two simultaneous trials looks first."""
    held = {
        t.user_attrs[BUDGET_INDEX]
        for t in trials
        if BUDGET_INDEX in t.user_attrs and (counts_against_budget(t) or t.state == TrialState.RUNNING)
    }
    waiting = sorted(t.number for t in trials if t.state == TrialState.RUNNING and BUDGET_INDEX not in t.user_attrs)
    free = (k for k in itertools.count() if k not in held)
    return next(itertools.islice(free, waiting.index(number), None))


def counts_against_budget(trial: optuna.trial.FrozenTrial) -> bool:
    """Complete, pruned, or failed because of its own hyperparameters (NaN loss). Trials
    interrupted, crashed or stopped from outside do not count: their place is taken again."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and bool(trial.user_attrs.get(FAILED_ON_ITS_OWN))
    )


def open_places(study: optuna.Study, budget: int) -> int:
    """Places of the budget not taken by a finished or running trial (of any worker)."""
    trials = study.get_trials(deepcopy=False)
    return max(0, budget - sum(counts_against_budget(t) or t.state == TrialState.RUNNING for t in trials))


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that used up budget: complete, pruned, or failed because of their own
    hyperparameters (NaN loss). Trials interrupted or crashed from outside do not count:
    the next run repeats them."""
    return [trial for trial in study.get_trials(deepcopy=False) if counts_against_budget(trial)]


def fail_stale_running(study: optuna.Study) -> int:
    """Mark RUNNING trials left behind by a killed process as FAIL; returns how many.

    Only for a coordinator that knows no other worker is running on this study (journal storage:
    the workers are its own processes); with RDB storage `fail_stale` goes by the heartbeat.
    """
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
    return len(stale)


def split_quota(remaining: int, workers: int) -> list[int]:
    """Split `remaining` trials over `workers` as evenly as possible (exact total, no zeros)."""
    workers = max(1, min(workers, remaining))
    return [remaining // workers + (i < remaining % workers) for i in range(workers)] if remaining else []
