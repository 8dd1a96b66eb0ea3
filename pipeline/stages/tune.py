"""Stage `tune@<variant>` (and `depth_tune@<k>`): Optuna searches head_units and learning_rate
for one strategy.

Reads params.yaml (`seed`, `model`, `train`, `variants.<variant>`, `tune`, `mlflow`) and the
prepared data. Every trial is trained by the train stage's function under its rule (up to
`train.max_epochs`, early stopping on validation loss with `train.patience`, best epoch kept),
so a learning rate is judged at the horizon it will be used at; the value maximised is the kept
epoch's validation accuracy. Budget: `tune.n_trials` trials for every strategy, the first
`tune.startup_trials` a space-filling design, then TPE; successive halving inside the study
(`tune.halving_epoch`, `tune.halving_factor`) stops the trials that rank low at the rung epoch,
for strategies that train end to end only (`Params.halving_epoch`).
Writes into `--out` (results/tune/<variant>):
  best_params.json   head_units, learning_rate, best value, trial, budget, edge flag
  trials.csv         one row per trial: params, state, value, value at the rung, epochs, seconds
  figures/           optimization history, parameter importances, head_units x learning_rate
  study.journal      the Optuna study (persistent: an interrupted study resumes, only the
                     missing trials run); with `tune.storage` a database URL the study lives
                     there and this file is a copy of it, written once the study is complete.
MLflow: a parent run `tune/<variant>` and one nested run per trial.

`--depth K` tunes the depth sweep's strategy `top<K>` (the top K conv layers train) instead
of a named one, `--parameter-efficient NAME` a strategy of studies.parameter_efficient.
`--worker --n-trials K --parent-run-id ID` joins the study from another process or machine and
runs K trials; `tune.n_workers: N` starts N local workers itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import optuna

from pipeline.core.data import load_split, load_summary
from pipeline.core.fit import NonFiniteLossError, RunConfig, Splits, fit_variant
from pipeline.core.frozen_features import FeatureCache
from pipeline.core.params import Params, load_params
from pipeline.core.weights import load_base_weights
from pipeline.runtime import code_deps
from pipeline.runtime.atomic import ensure_writable
from pipeline.runtime.cli import add_strategy_arguments, run_stage, strategy_argv
from pipeline.runtime.errors import PipelineError
from pipeline.runtime.progress import ProgressLine
from pipeline.stack import metric_names, optuna_study, tracking
from pipeline.stack.optuna_outputs import write_outputs


def _code_sha256() -> str:
    """The source of the stage's code (code_deps: the modules it imports, which dvc.yaml's folders
    cover): a change there is a new study."""
    digest = hashlib.sha256()
    for path in code_deps.stage_files("stages.tune"):
        digest.update(path.encode() + b"\0" + (code_deps.PACKAGE.parent / path).read_bytes())
    return digest.hexdigest()


def study_identity(params: Params, variant: str, weights_sha256: str | None, data_sha256: str) -> dict:
    """Everything a trial's result depends on (code included), except the number of trials: the
    run configuration a trial trains under (`RunConfig`, so a new field of it is part of the
    identity by construction) without what the trial chooses, and the search."""
    run = RunConfig.from_params(params, variant, head_units=0, learning_rate=0.0, num_classes=0, seed=params.seed)
    chosen = ("head_units", "learning_rate", "num_classes")  # the trial's own; classes follow from the data
    return {
        "code_sha256": _code_sha256(),
        "weights_sha256": weights_sha256,
        "data_sha256": data_sha256,
        "run": {k: _plain(v) for k, v in dataclasses.asdict(run).items() if k not in chosen},
        "search": {
            "head_units": params.tune.head_units,
            "learning_rate": params.learning_rate_range(variant),
            "startup_trials": params.tune.startup_trials,
            "design_seed": params.tune.design_seed,
            "halving": [params.halving_epoch(variant), params.tune.halving_factor],
        },
    }


def _plain(value):
    """A RunConfig value as JSON: sets sorted, tuples as lists."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class Objective:
    """One trial: suggest, train with `fit_variant`, log a nested MLflow run, return the value."""

    def __init__(self, params: Params, variant: str, context: dict, parent_run_id: str | None):
        self.params, self.variant, self.context = params, variant, context
        self.parent_run_id = parent_run_id
        self.budget = params.tune.n_trials

    def __call__(self, trial: optuna.Trial) -> float:
        index = trial.study.sampler.budget_index[trial.number]
        if index >= self.budget:
            trial.set_user_attr(optuna_study.OVER_BUDGET, True)
            raise optuna_study.OverBudget(
                f"place {index} of a budget of {self.budget}: other workers took the last places "
                "while this trial started; it did not train"
            )
        head_units = trial.suggest_categorical("head_units", list(self.params.tune.head_units))
        learning_rate = trial.suggest_float("learning_rate", *self.params.learning_rate_range(self.variant), log=True)
        config = RunConfig.from_params(
            self.params,
            self.variant,
            head_units=head_units,
            learning_rate=learning_rate,
            num_classes=len(self.context["class_names"]),
            seed=self.params.seed,
        )
        trial.set_user_attr("worker_pid", os.getpid())
        trial.set_user_attr("worker_host", socket.gethostname())
        name = f"tune/{self.variant}/trial-{index}"
        tags = {"stage": "tune", "variant": self.variant, "trial": index, "study": trial.study.study_name}
        keras.backend.clear_session()  # trials build models in a loop: free the previous graph
        with tracking.run(name, tags=tags, params=trial.params, parent_run_id=self.parent_run_id, system_metrics=True):
            digests = tracking.split_digests(self.context["summary"])
            del digests["test"]  # trials never see the test split
            tracking.log_datasets(self.context["prepared"], tracking.dataset_name(self.context["summary"]), digests)
            value, epochs = self._train(trial, config, name)
        if value is None:  # raised outside the run, which ends FINISHED: pruning is the rule working
            raise optuna.TrialPruned(f"cut at epoch {epochs} by successive halving")
        return value

    def _train(self, trial: optuna.Trial, config: RunConfig, name: str) -> tuple[float | None, int]:
        """Train the trial's run inside its MLflow run: (its value, epochs run); value None when the
        pruner cut it at a rung."""
        rung = _ReportToTrial(trial, config.max_epochs)
        callbacks = [tracking.EpochLogger(), ProgressLine(name, config.max_epochs), rung]
        context = self.context
        try:
            result = fit_variant(
                config, context["weights"], context["splits"], context["data_sha256"], context["cache"], callbacks
            )
        except NonFiniteLossError:
            trial.set_user_attr(optuna_study.FAILED_ON_ITS_OWN, "non-finite loss")
            tracking.set_tags({"state": "FAIL"})
            raise
        except optuna.TrialPruned:
            trial.set_user_attr("epochs_run", rung.epochs)
            trial.set_user_attr("train_seconds", rung.seconds)  # epochs only, as result.train_seconds
            tracking.set_tags({"state": "PRUNED"})
            tracking.log_metrics(metric_names.trial(rung.epochs))
            return None, rung.epochs
        trial.set_user_attr("epochs_run", len(result.history))
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("stopped_early", result.stopped_early)
        trial.set_user_attr("train_seconds", result.train_seconds)
        tracking.set_tags({"state": "COMPLETE"})
        tracking.log_metrics(metric_names.trial(len(result.history), result.best_val_accuracy, result.best_epoch))
        return result.best_val_accuracy, len(result.history)


class _ReportToTrial(keras.callbacks.Callback):
    """Reports the best validation accuracy so far to the Optuna trial after every epoch (its
    intermediate values: the halving rung and `pipeline.tools.bench.halving` read them) and stops the
    trial when the study's pruner says so (`optuna.TrialPruned` out of `fit`). A trial whose
    training rule has just ended it (patience ran out, or its last epoch) is complete, never
    pruned. `seconds`: the epochs' wall time, what `FitResult.train_seconds` counts."""

    def __init__(self, trial: optuna.Trial, max_epochs: int):
        super().__init__()
        self.trial, self.max_epochs = trial, max_epochs
        self.best, self.epochs, self.seconds = float("-inf"), 0, 0.0

    def on_epoch_end(self, epoch, logs=None):
        self.seconds += float((logs or {}).get("epoch_seconds", 0.0))  # the training function's clock
        self.epochs = epoch + 1
        self.best = max(self.best, float((logs or {}).get("val_accuracy", float("-inf"))))
        self.trial.report(self.best, step=self.epochs)
        finished = self.model.stop_training or self.epochs >= self.max_epochs
        if not finished and self.trial.should_prune():
            raise optuna.TrialPruned()


def _print_trial(variant: str, start: float):
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        epochs = trial.user_attrs.get("epochs_run", "?")
        complete = trial.state == optuna.trial.TrialState.COMPLETE
        outcome = f"value {trial.value:.4f}" if complete else trial.state.name.lower()
        if trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values:
            outcome += f" at {trial.intermediate_values[trial.last_step]:.4f}"
        index = trial.user_attrs.get("budget_index", trial.number)
        print(
            f"[tune/{variant}] trial {index}: {params} -> {outcome} ({epochs} epochs, "
            f"{time.perf_counter() - start:.0f}s elapsed)",
            flush=True,
        )

    return callback


def trial_context(params: Params, variant: str, prepared: Path, feature_cache: str) -> dict:
    summary = load_summary(prepared)
    weights = load_base_weights(params.variant_weights(variant))
    splits = Splits(load_split(prepared, "train"), load_split(prepared, "val"))
    return {
        "summary": summary,
        "class_names": summary["class_names"],
        "data_sha256": summary["data_sha256"],
        "weights": weights,
        "splits": splits,
        "cache": FeatureCache(feature_cache),
        "prepared": str(Path(prepared).resolve()),
    }


def _open_study(params: Params, variant: str, out: Path, context: dict) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is printed instead
    storage = optuna_study.open_storage(params.tune.storage, out / "study.journal", params.tune.heartbeat_seconds)
    identity = study_identity(params, variant, context["weights"].sha256, context["data_sha256"])
    tune = params.tune
    search = params.learning_rate_range(variant)
    points = optuna_study.design(tune.design_seed, variant, list(tune.head_units), search, tune.startup_trials)
    sampler = optuna_study.BudgetSampler(tune.design_seed, points)
    pruner = optuna_study.HalvingPruner(params.halving_epoch(variant), tune.halving_factor)
    name = optuna_study.study_name(variant, identity)
    return optuna_study.load_or_create(storage, name, sampler=sampler, pruner=pruner)


def run_trials(
    study, params: Params, variant: str, context: dict, parent_run_id: str | None, max_trials: int | None = None
) -> int:
    """Run trials while the study's budget has open places (shared with every other worker on the
    storage), at most `max_trials`; returns how many this process started."""
    objective = Objective(params, variant, context, parent_run_id)
    callback = _print_trial(variant, time.perf_counter())
    started = 0
    while max_trials is None or started < max_trials:
        optuna_study.fail_stale(study)  # a dead worker's place is open again
        if optuna_study.open_places(study, objective.budget) == 0:
            break
        study.optimize(objective, n_trials=1, catch=(NonFiniteLossError, optuna_study.OverBudget), callbacks=[callback])
        started += 1
    return started


def finish_study(study, params: Params, variant: str, context: dict, parent_run_id: str) -> None:
    """RDB storage: the coordinator's share is done; run any place that opens again (a worker that
    died: its trial fails after the heartbeat's grace period) and wait for the trials that other
    workers are still running, so that the outputs are written from the complete study."""
    announced = False
    while True:
        run_trials(study, params, variant, context, parent_run_id)
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if not running:
            return
        if not announced:
            grace = optuna_study.STALE_AFTER_HEARTBEATS * params.tune.heartbeat_seconds
            print(
                f"[tune/{variant}] waiting for {len(running)} trial(s) running in other workers "
                f"(a worker silent for {grace} s is failed and its trial rerun here)",
                flush=True,
            )
            announced = True
        time.sleep(params.tune.heartbeat_seconds)


def _spawn_workers(args, quotas: list[int], parent_run_id: str) -> None:
    """Start one `--worker` process per quota and wait; Ctrl-C/SIGTERM stops them all."""
    which = strategy_argv(args)
    inputs = ["--params", args.params, "--prepared", str(args.prepared), "--out", str(args.out)]
    command = [sys.executable, "-m", "pipeline.stages.tune", *which, *inputs, "--feature-cache", args.feature_cache]
    command += ["--worker", "--parent-run-id", parent_run_id]
    workers = [subprocess.Popen([*command, "--n-trials", str(q)]) for q in quotas]
    try:
        codes = [w.wait() for w in workers]
    except KeyboardInterrupt:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait()
        raise
    if any(codes):
        raise PipelineError(f"tune workers exited with {codes}; rerun `dvc repro` to finish the missing trials")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_strategy_arguments(parser)
    parser.add_argument("--params", required=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--feature-cache", required=True)
    parser.add_argument(
        "--worker", action="store_true", help="join the study and run trials while its budget has open places"
    )
    parser.add_argument("--n-trials", type=int, help="with --worker: at most this many trials")
    parser.add_argument("--parent-run-id", help="with --worker: the MLflow run of the study (the coordinator's)")
    args = parser.parse_args(argv)
    if args.n_trials is not None and args.n_trials < 1:
        raise PipelineError(f"--n-trials {args.n_trials}: give K >= 1 (at most K trials in this worker) or omit it")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    params, args.variant = load_params(args.params).select(args.variant, args.depth, args.cut, args.parameter_efficient)
    ensure_writable(args.out, "--out")
    if params.train.cache_features:
        ensure_writable(args.feature_cache, "--feature-cache")
    tracking.open_store(params.mlflow, args.params)
    context = trial_context(params, args.variant, args.prepared, args.feature_cache)
    study = _open_study(params, args.variant, args.out, context)
    if args.worker:
        started = run_trials(study, params, args.variant, context, args.parent_run_id, args.n_trials)
        done = len(optuna_study.finished_trials(study))
        print(
            f"[tune/{args.variant}] worker done: {started} trial(s) started here; "
            f"{done} of {params.tune.n_trials} done in the study",
            flush=True,
        )
    else:
        coordinate(args, study, params, context)


def coordinate(args, study: optuna.Study, params: Params, context: dict) -> None:
    """The stage's own process: run the study's open places (here, in fresh worker processes, or
    with the workers other machines run), then write and log the tune stage's outputs."""
    # journal: the coordinator starts every worker, so a RUNNING trial now was cut off; RDB: only
    # trials whose worker stopped sending heartbeats (others may be running on other machines)
    heartbeat = optuna_study.has_heartbeat(study)
    stale = optuna_study.fail_stale(study) if heartbeat else optuna_study.fail_stale_running(study)
    done = len(optuna_study.finished_trials(study))
    remaining = optuna_study.open_places(study, params.tune.n_trials)
    elsewhere = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
    print(
        f"[tune/{args.variant}] study {study.study_name}: {done} trials done, {remaining} to run"
        + (f", {elsewhere} running in other workers" if elsewhere else "")
        + (f" ({stale} interrupted trial(s) will be repeated)" if stale else ""),
        flush=True,
    )
    tags = {"stage": "tune", "variant": args.variant, "study": study.study_name, **tracking.environment_tags()}
    with tracking.run(f"tune/{args.variant}", tags=tags, params={"tune": vars(params.tune)}) as parent_run_id:
        quotas = optuna_study.split_quota(remaining, params.tune.n_workers)
        per_process = params.tune.trials_per_process
        if len(quotas) == 1 and quotas[0] <= per_process:
            run_trials(study, params, args.variant, context, parent_run_id, quotas[0])
        elif len(quotas) == 1:
            # Keras keeps most of every trained model's memory (keras-team/keras#17458, ~200 MB per
            # VGG16): a long study runs in fresh worker processes, one after another
            for chunk in optuna_study.split_quota(quotas[0], -(-quotas[0] // per_process)):
                _spawn_workers(args, [chunk], parent_run_id)
        elif quotas:
            _spawn_workers(args, quotas, parent_run_id)
        if heartbeat:
            finish_study(study, params, args.variant, context, parent_run_id)
        if params.tune.storage != "journal":
            optuna_study.snapshot_to_journal(study, args.out / "study.journal")
        best = write_outputs(study, args.out, params, args.variant, len(context["splits"].val[1]))
        _log_best(best, args.out)
    print(
        f"[tune/{args.variant}] best: head_units={best['head_units']} learning_rate={best['learning_rate']:.3g} "
        f"-> val accuracy {best['value']:.4f} (trial {best['trial']})",
        flush=True,
    )


def _log_best(best: dict, out: Path) -> None:
    """The study's result on its MLflow run: the best trial, the budget spent, the output files."""
    tracking.log_params({"best": {k: best[k] for k in ("head_units", "learning_rate", "trial")}})
    tracking.log_metrics(metric_names.study(best))
    # the tuning curve: expected best validation accuracy after n trials, one step per n (Dodge et al. 2019)
    curve = best["tuning_curve"]
    for n, (expected, std) in enumerate(zip(curve["expected_best"], curve["std"], strict=True), 1):
        tracking.log_metrics(metric_names.tuning_curve_point(expected, std), step=n)
    if best["learning_rate_at_edge"]:
        tracking.set_tags({"learning_rate_at_edge": best["learning_rate_at_edge"]})
    tracking.log_artifacts([out / "best_params.json", out / "trials.csv", *sorted((out / "figures").glob("*.png"))])


if __name__ == "__main__":
    run_stage(main)
