"""How much the tuning itself moves the answer: the same strategy tuned under two design seeds.

  python -m pipeline.tools.bench.tuning_noise --run A=RESULTS_A --run B=RESULTS_B --variant full
      [--variant partial ...] [--out FILE.json]

Each RESULTS folder holds `tune/<variant>/best_params.json` and `train/<variant>/` (the tune and
train stages' outputs, e.g. the default run's `results/` and a copy made with
`-S tune.design_seed=2`). For every variant this prints, per run, the chosen head size and
learning rate, the best trial's validation accuracy, and the test accuracy over the trained seeds
with its 95% interval (seeds and test images); then the spread between runs: the ratio of the
largest to the smallest chosen learning rate and the range of the test accuracies, with the
paired difference of the first two runs (same seeds, same test images). Not a stage: a
measurement for docs/study_run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.core.results import read_best_params, read_test_correct, read_tuning
from pipeline.core.stats import accuracy_interval, difference_interval
from pipeline.runtime.atomic import write_json


def run_row(results: Path, variant: str) -> dict:
    """One run's choice for `variant` and what it gave on test."""
    chosen = read_best_params(results / "tune" / variant / "best_params.json")
    tuning = read_tuning(results / "tune", variant)["best"]
    _, correct = read_test_correct(results / "train", variant)
    interval = accuracy_interval(correct)
    return {
        **chosen,
        "best_val_accuracy": tuning["value"],
        "trial": tuning["trial"],
        "design_seed": tuning["budget"].get("design_seed"),
        "test_accuracy": interval.mean,
        "ci95": [interval.low, interval.high],
        "seeds": int(correct.shape[0]),
    }


def spread(rows: dict[str, dict], correct: list) -> dict:
    """Across runs: learning-rate ratio (largest / smallest), test accuracy range, and the paired
    difference (second run minus first) on the same seeds and test images."""
    rates = [r["learning_rate"] for r in rows.values()]
    tests = [r["test_accuracy"] for r in rows.values()]
    difference = difference_interval(correct[1], correct[0])
    return {
        "learning_rate_ratio": max(rates) / min(rates),
        "head_units": sorted({r["head_units"] for r in rows.values()}),
        "test_accuracy_range": max(tests) - min(tests),
        "paired_difference": {"mean": difference.mean, "ci95": [difference.low, difference.high]},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="NAME=RESULTS_FOLDER (at least two)")
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    runs = dict(item.split("=", 1) for item in args.run)
    if len(runs) < 2:
        parser.error("give at least two --run NAME=FOLDER")
    table = {}
    for variant in args.variant:
        rows = {name: run_row(Path(folder), variant) for name, folder in runs.items()}
        correct = [read_test_correct(Path(folder) / "train", variant)[1] for folder in runs.values()]
        table[variant] = {"runs": rows, "spread": spread(rows, correct)}
        for name, r in rows.items():
            print(
                f"{variant:<12} {name:<10} head {r['head_units']:>3}  lr {r['learning_rate']:.2e}  "
                f"val {r['best_val_accuracy']:.3f}  test {r['test_accuracy']:.3f} "
                f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] ({r['seeds']} seeds)"
            )
        s, d = table[variant]["spread"], table[variant]["spread"]["paired_difference"]
        print(
            f"{variant:<12} spread     lr ratio {s['learning_rate_ratio']:.1f}x, test range "
            f"{s['test_accuracy_range']:.3f}, paired difference {d['mean']:+.3f} "
            f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
        )
    if args.out:
        write_json(args.out, table)


if __name__ == "__main__":
    main()
