"""Are two runs of the pipeline the same, wall-clock measurements aside?

    python -m pipeline.tools.compare_runs OLD NEW     # OLD, NEW: repository roots (or copies) after `dvc repro`

Compares every JSON and CSV file under results/ plus reports/summary.json and
reports/metrics.json, file by file, after removing what measures time or names a registry entry
or a study: JSON keys holding "seconds" and those in VOLATILE_KEYS, CSV columns holding "seconds".
The answer (reports/summary.json `answer`: costs in FLOPs, cost ratios, the recommendation) is
compared in full: two runs of the same code and data must agree on it to the last digit.
Not compared: models and figures (binary files with timestamps; the models are compared through
`test_predictions.csv`, every test image's prediction) and the Optuna journals (timestamps;
`trials.csv` has every trial).
Prints the files that differ or exist on one side only; exit 0 when none, 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

REPORT_FILES = ("reports/summary.json", "reports/metrics.json")
VOLATILE_KEYS = (
    "timing",  # wall-clock measurements
    "model_uri",  # a new MLflow model on every registration
    "version",  # its registry version
    "study",  # the Optuna study's name hashes the stage's code: any code change renames it
)


def comparable_files(root: Path) -> list[str]:
    """The files compared, relative to `root`."""
    names = [str(p.relative_to(root)) for p in (root / "results").rglob("*") if p.suffix in (".json", ".csv")]
    return sorted(names + [name for name in REPORT_FILES if (root / name).is_file()])


def _strip(value: object) -> object:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if "seconds" not in k and k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def content(path: Path) -> object:
    """The file's content without its time measurements."""
    text = path.read_text()
    if path.suffix == ".json":
        return _strip(json.loads(text))
    rows = list(csv.DictReader(io.StringIO(text)))
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]


def differences(old: Path, new: Path) -> list[str]:
    old_files, new_files = set(comparable_files(old)), set(comparable_files(new))
    lines = [f"only in {old}: {name}" for name in sorted(old_files - new_files)]
    lines += [f"only in {new}: {name}" for name in sorted(new_files - old_files)]
    shared = sorted(old_files & new_files)
    lines += [f"differs: {name}" for name in shared if content(old / name) != content(new / name)]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args(argv)
    found = differences(args.old, args.new)
    for line in found:
        print(line)
    print(f"{len(comparable_files(args.new))} files compared, {len(found)} difference(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
