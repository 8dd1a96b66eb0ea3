"""How the head should pool each cut's feature map: a convex probe on every cut x pooling.

  python -m pipeline.tools.bench.pooling [--params params.yaml] [--prepared data/prepared]
      [--cuts block1,block2,...] [--out reports/benchmark_pooling.json]

For each cut point (the base ending after `<cut>_pool`, on `model.weights`) and each pooling of
its map (flattened; average-pooled to a 2x2 grid; global average; and the window `model.pooling:
auto` picks), this fits the baselines stage's convex probe (logistic regression, L2 strength C
chosen on validation log-loss, standardised features) and prints its validation and test
accuracy and the number of values the head would receive. The measurement behind the `auto` rule
(README "Where the network is cut"); not a stage, and it decides nothing by itself: the
strategies at each cut are trained and compared by the pipeline.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pipeline.core.data import load_split, load_summary
from pipeline.core.evaluation import evaluate
from pipeline.core.params import load_params
from pipeline.core.vgg16 import CUT_POINTS, feature_map, head_pool_size
from pipeline.runtime.atomic import write_json
from pipeline.runtime.cli import run_stage
from pipeline.stages.baselines import average_pool, cut_maps, fit_logistic_regression, standardize


def poolings(side: int, channels: int) -> dict[str, int | None]:
    """{label: average-pooling window (None = global average)} for a side x side x channels map;
    windows that give the same features appear once, the first label kept."""
    auto = head_pool_size(side, channels, "auto")
    candidates = {
        "flatten": 1,
        "2x2 grid": -(-side // 2),
        "global average": None,
        f"{auto}x{auto} average, flattened": auto,
    }
    out: dict[str, int | None] = {}
    for label, window in candidates.items():
        grid = 1 if window is None else -(-side // window)
        if all((1 if w is None else -(-side // w)) != grid for w in out.values()):
            out[label] = window
    return out


def measure(params, prepared: Path, cuts: list[str], cache_dir: str | None) -> list[dict]:
    splits = {name: load_split(prepared, name) for name in ("train", "val", "test")}
    summary = load_summary(prepared)
    labels = {name: y for name, (_, y) in splits.items()}
    rows = []
    for cut in cuts:
        side, channels = feature_map(params.data.image_size, cut)
        maps = cut_maps(params, splits, summary["data_sha256"], cache_dir, cut)
        for label, window in poolings(side, channels).items():
            start = time.perf_counter()
            pooled = {
                name: m.mean(axis=(1, 2)) if window is None else average_pool(m, window) for name, m in maps.items()
            }
            values = standardize(pooled)
            predict, record = fit_logistic_regression(
                (values["train"], labels["train"]), (values["val"], labels["val"])
            )
            test = evaluate(labels["test"], predict(values["test"]), summary["class_names"])["test_accuracy"]
            row = {
                "cut_after": cut,
                "pooling": label,
                "values": int(values["train"].shape[1]),
                "auto": window == head_pool_size(side, channels, "auto"),
                "val_accuracy": record["val_accuracy"],
                "test_accuracy": test,
                "C": record["C"],
                "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            print(
                f"[pooling] {cut} {label:<20} {row['values']:>6} values  val {row['val_accuracy']:.3f}  "
                f"test {test:.4f}  C={record['C']:g}",
                flush=True,
            )
    return rows


def table(rows: list[dict], image_size: int, weights: str) -> str:
    lines = [
        f"Convex probe per cut and pooling ({image_size}x{image_size} input, `{weights}` weights)",
        "",
        "| cut after | pooling | values | val accuracy | test accuracy | C |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        pooling = r["pooling"] + (" (auto)" if r["auto"] else "")  # the pooling `model.pooling: auto` picks
        lines.append(
            f"| {r['cut_after']} | {pooling} | {r['values']:,} | {r['val_accuracy']:.3f} | "
            f"{r['test_accuracy']:.4f} | {r['C']:g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--cuts", default=",".join(CUT_POINTS), help="comma-separated cut points")
    parser.add_argument("--cache-dir", default=".cache/features", help="the shared feature cache ('' = none)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cuts = [c.strip() for c in args.cuts.split(",") if c.strip()]
    unknown = [c for c in cuts if c not in CUT_POINTS]
    if unknown:
        parser.error(f"--cuts: unknown cut point(s) {unknown}; choose from {list(CUT_POINTS)}")
    rows = measure(params, args.prepared, cuts, args.cache_dir or None)
    print(table(rows, params.data.image_size, params.model.weights))
    if args.out:
        write_json(args.out, {"image_size": params.data.image_size, "weights": params.model.weights, "rows": rows})


if __name__ == "__main__":
    run_stage(main)
