"""Where successive halving may cut a trial: measured on unpruned studies.

  python -m pipeline.bench.halving STUDY_DIR [STUDY_DIR ...] [--factor 3] [--out FILE.json]

Each STUDY_DIR is a tune stage's output folder (`study.journal`, trials.csv) of a study run with
`tune.halving_epoch: 0`, so every trial trained under the full training rule and reported its
best validation accuracy so far after every epoch. For every candidate rung r this prints, per
strategy: the Spearman rank correlation between the value at epoch r and the trial's final value
(the kept epoch's validation accuracy), which trials a `HalvingPruner(r, factor)` would have cut
in budget order, whether the study's best trial would have been among them, and the epochs the
cut trials would have saved. The lowest rung where the ranking holds is the one to use
(README "Tuning"). Not a stage: a measurement, like the rest of `pipeline.bench`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from scipy import stats

from pipeline.atomic import write_json
from pipeline.optuna_study import BUDGET_INDEX, halving_cuts

RUNGS = (1, 2, 3, 4, 5, 6, 8)


def study_curves(folder: Path) -> list[dict]:
    """The complete trials of the study a tune output folder reports on (`best_params.json`
    names it; its `study.journal` may hold earlier studies too), in budget order: per-epoch values
    (best validation accuracy so far), final value and epochs run."""
    name = json.loads((folder / "best_params.json").read_text())["study"]
    storage = JournalStorage(JournalFileBackend(str(folder / "study.journal")))
    study = optuna.load_study(study_name=name, storage=storage)
    trials = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    trials.sort(key=lambda t: t.user_attrs.get(BUDGET_INDEX, t.number))
    return [
        {
            "curve": dict(t.intermediate_values),
            "value": float(t.value),
            "epochs": int(t.user_attrs.get("epochs_run") or max(t.intermediate_values)),
            "learning_rate": t.params["learning_rate"],
        }
        for t in trials
    ]


def at_rung(trials: list[dict], rung: int, factor: int) -> dict:
    """The halving decision at `rung` replayed on unpruned trials in budget order (each trial
    compared with the earlier ones that reached the rung, as the pruner does), and the rank
    correlation between the value at the rung and the final value."""
    reached = [t for t in trials if rung in t["curve"]]
    seen: list[float] = []
    cut = []
    for index, trial in enumerate(trials):
        if rung not in trial["curve"]:
            continue
        if halving_cuts(trial["curve"][rung], seen, factor):
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", type=Path, help="tune output folders of unpruned studies")
    parser.add_argument("--factor", type=int, default=3, help="keep the top 1/factor at the rung")
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args(argv)
    table = {}
    for folder in args.studies:
        trials = study_curves(folder)
        table[folder.name] = {"trials": trials, "rungs": [at_rung(trials, r, args.factor) for r in RUNGS]}
    print("strategy      rung  spearman  cut  best cut  regret  epochs (unpruned -> pruned)")
    for name, entry in table.items():
        for row in entry["rungs"]:
            rho = "   -  " if row["spearman"] is None else f"{row['spearman']:+.2f} "
            print(
                f"{name:<13} {row['rung']:>4}  {rho:>8}  {len(row['cut']):>3}  {row['best_cut']!s:>8}  "
                f"{row['regret']:.3f}   {row['epochs_unpruned']} -> {row['epochs_pruned']}"
            )
    if args.out:
        write_json(args.out, {"factor": args.factor, "studies": table})


if __name__ == "__main__":
    main()
