"""Did successive halving cut a trial that the full horizon would have kept? Measured by
training every cut trial to the end.

  python -m pipeline.tools.bench.halving --variant V [--variant ...] [--params params.yaml]
      [--prepared data/prepared] [--tune-dir results/tune] [--feature-cache .cache/features]
      [--out FILE.json]

For each strategy this reads its tune study (`<tune-dir>/<V>/best_params.json` names it in
`study.journal`), trains every trial that `tune.halving_epoch` cut under the whole training rule
(the trial's own head size, learning rate and seed, no pruning; the same function as the tune
stage), and checks that the replay reproduces the value the trial had at the rung. With every
trial's curve complete it prints, for each candidate rung r: the Spearman rank correlation
between the best validation accuracy by epoch r and the trial's final value, which trials a
`HalvingPruner(r, tune.halving_factor)` cuts in budget order, whether the best trial is among
them and the validation accuracy lost (`regret`), and the epochs the cuts save. Not a stage: a
measurement (docs/study_run), like the rest of `pipeline.tools.bench`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from scipy import stats

from pipeline.runtime.atomic import write_json
from pipeline.stack.optuna_study import BUDGET_INDEX, halving_cuts

RUNGS = (1, 2, 3, 4, 5, 6, 8)


def study_trials(folder: Path) -> list[dict]:
    """The counted trials (complete or cut) of the study a tune output folder reports on, in
    budget order: parameters, per-epoch values (best validation accuracy so far), final value (None
    when cut), epochs run."""
    name = json.loads((folder / "best_params.json").read_text())["study"]
    storage = JournalStorage(JournalFileBackend(str(folder / "study.journal")))
    study = optuna.load_study(study_name=name, storage=storage)
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    trials.sort(key=lambda t: t.user_attrs.get(BUDGET_INDEX, t.number))
    return [
        {
            "trial": t.user_attrs.get(BUDGET_INDEX, t.number),
            "state": t.state.name,
            "head_units": t.params["head_units"],
            "learning_rate": t.params["learning_rate"],
            "curve": {int(k): float(v) for k, v in t.intermediate_values.items()},
            "value": float(t.value) if t.state == TrialState.COMPLETE else None,
            "epochs": int(t.user_attrs.get("epochs_run") or max(t.intermediate_values)),
        }
        for t in trials
    ]


def best_so_far(history: list[dict]) -> dict[int, float]:
    """{epoch: best validation accuracy up to it} from a FitResult history."""
    running = np.maximum.accumulate([row["val_accuracy"] for row in history])
    return {int(row["epoch"]): float(v) for row, v in zip(history, running, strict=True)}


def at_rung(trials: list[dict], rung: int, factor: int) -> dict:
    """The halving decision at `rung` replayed on complete curves in budget order (each trial
    compared with the earlier ones that reached the rung, as the pruner does), and the rank
    correlation between the value at the rung and the final value."""
    reached = [t for t in trials if rung in t["curve"]]
    seen: list[float] = []
    cut = []
    for index, trial in enumerate(trials):
        if rung not in trial["curve"]:
            continue
        # a trial its rule stopped at the rung is complete; it still ranks the later ones
        if rung < trial["epochs"] and halving_cuts(trial["curve"][rung], seen, factor):
            cut.append(index)
        seen.append(trial["curve"][rung])
    rho = None
    if len(reached) >= 3:
        rho = float(stats.spearmanr([t["curve"][rung] for t in reached], [t["value"] for t in reached]).statistic)
    best = max(range(len(trials)), key=lambda i: (trials[i]["value"], -i))
    kept_best = max(trials[i]["value"] for i in range(len(trials)) if i not in cut)
    return {
        "rung": rung,
        "spearman": rho,
        "reached": len(reached),
        "cut": cut,
        "best_cut": best in cut,
        "regret": trials[best]["value"] - kept_best,  # validation accuracy lost by the cuts
        "epochs_unpruned": sum(t["epochs"] for t in trials),
        "epochs_pruned": sum(rung if i in cut else t["epochs"] for i, t in enumerate(trials)),
    }


def complete_cut_trials(params, variant: str, trials: list[dict], context: dict) -> None:
    """Train every cut trial of `trials` to the end of the training rule, in place: its final
    value, epochs and whole curve, plus `replay_matches` (its curve up to the cut equals the one
    the study recorded)."""
    import keras

    from pipeline.core.fit import RunConfig, fit_variant

    for trial in trials:
        if trial["state"] != "PRUNED":
            continue
        config = RunConfig.from_params(
            params,
            variant,
            head_units=trial["head_units"],
            learning_rate=trial["learning_rate"],
            num_classes=len(context["class_names"]),
            seed=params.seed,  # what every tune trial trains with
        )
        keras.backend.clear_session()
        result = fit_variant(config, context["weights"], context["splits"], context["data_sha256"], context["cache"])
        curve, cut_at = best_so_far(result.history), max(trial["curve"])
        trial["replay_matches"] = all(np.isclose(curve[e], v, rtol=0, atol=1e-6) for e, v in trial["curve"].items())
        trial.update(curve=curve, value=result.best_val_accuracy, epochs=len(result.history), cut_at=cut_at)
        print(
            f"[halving] {variant} trial {trial['trial']}: cut at epoch {cut_at} ({trial['curve'][cut_at]:.3f}); "
            f"under the whole rule {trial['value']:.3f} after {trial['epochs']} epochs "
            f"(replay matches the study: {trial['replay_matches']})",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    from pipeline.core.params import load_params
    from pipeline.stages.tune import trial_context

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--tune-dir", type=Path, default=Path("results/tune"))
    parser.add_argument("--feature-cache", default=".cache/features")
    parser.add_argument("--out", type=Path, help="write every curve and the table as JSON here")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    factor = params.tune.halving_factor
    table = {}
    for variant in args.variant:
        trials = study_trials(args.tune_dir / variant)
        complete_cut_trials(params, variant, trials, trial_context(params, variant, args.prepared, args.feature_cache))
        table[variant] = {"trials": trials, "rungs": [at_rung(trials, r, factor) for r in RUNGS]}
    print(f"strategy      rung  spearman  cut  best cut  regret  epochs (unpruned -> pruned), factor {factor}")
    for name, entry in table.items():
        for row in entry["rungs"]:
            rho = "-" if row["spearman"] is None else f"{row['spearman']:+.2f}"
            print(
                f"{name:<13} {row['rung']:>4}  {rho:>8}  {len(row['cut']):>3}  {row['best_cut']!s:>8}  "
                f"{row['regret']:.3f}   {row['epochs_unpruned']} -> {row['epochs_pruned']}"
            )
    if args.out:
        write_json(args.out, {"halving_epoch": params.tune.halving_epoch, "factor": factor, "studies": table})


if __name__ == "__main__":
    main()
