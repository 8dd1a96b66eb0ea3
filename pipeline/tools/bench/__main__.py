"""Benchmark: where the time goes, measured on this machine on the prepared data.

  python -m pipeline.tools.bench                # compute, strategies, a large study (about 10 min)
  python -m pipeline.tools.bench --end-to-end   # clean `dvc repro` in a temporary copy, no-op repro,
                                          # wall time and peak memory per stage (about 70 min)
  python -m pipeline.tools.bench --numerics     # XLA and bfloat16 against float32 (about 5 min)
  python -m pipeline.tools.bench --tune         # tune trials/min per strategy under the training rule (~7 min)
  python -m pipeline.tools.bench --folders      # an image folder of camera-size JPEGs, old and new reading (~3 min)
  python -m pipeline.tools.bench --parameter-efficient  # the strategies section for studies.parameter_efficient's
                                          # strategies: bias-only, LoRA, scale-and-shift, surgical (~8 min)

Writes reports/benchmark.json, benchmark_e2e.json, benchmark_numerics.json, benchmark_tune.json,
benchmark_folders.json or benchmark_parameter_efficient.json, then renders
reports/benchmark.md from whichever exist (each part says when and at which commit it ran). Every timed figure is a
median with min and max over its repetitions (the count is in the table). Timings are never
tests; this script is where they live.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.core.params import load_params
from pipeline.runtime.atomic import ensure_writable, write_json, write_text
from pipeline.runtime.cli import run_stage
from pipeline.runtime.errors import ConfigError
from pipeline.tools.bench.measure import (
    flop_bound,
    forward_throughput,
    matmul_flops,
    numerics_options,
    strategy_timings,
    tune_rates,
)
from pipeline.tools.bench.scale import end_to_end, large_study
from pipeline.tools.bench.tables import render

REPO = Path(__file__).resolve().parents[3]  # pipeline/tools/bench/ -> the repository


def run_sections(args) -> dict:
    """The in-process sections named in `args.sections`, in this process."""
    import tensorflow as tf

    from pipeline.core.weights import load_base_weights

    params, splits, summary = _load(args)
    if args.parameter_efficient:
        params = _study_params(params)
    sections = set(args.sections.split(","))
    num_classes = len(summary["class_names"])
    weights = {v: load_base_weights(params.variant_weights(v)) for v in params.variants}
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="vgg16-bench-cache-"))
    out: dict = {"tensorflow": tf.__version__}
    if "compute" in sections:
        out["matmul"] = matmul_flops(2048, args.repeats)
        print(f"[bench] matmul {out['matmul']['gflops']:.1f} GFLOP/s", flush=True)
        pretrained = next(w for w in weights.values() if w.arrays is not None)
        out["forward"] = forward_throughput(params, pretrained, splits.train[0], out["matmul"], args.repeats)
    if "strategies" in sections:
        out["flop_bound"] = flop_bound(params, num_classes, splits)
        out["strategies"] = strategy_timings(
            params, weights.__getitem__, splits, summary["data_sha256"], num_classes, cache
        )
    if "large" in sections:
        with tempfile.TemporaryDirectory(prefix="vgg16-bench-large-", dir=cache.parent) as work:
            out["large_study"] = large_study(
                params, args.large_images, args.large_size, Path(work), args.synthetic_images
            )
    return out


def _study_params(params):
    """`params` with the parameter-efficient study's strategies (all it defines) as the strategies
    to time, so they are measured exactly as the main ones are."""
    study = params.studies.parameter_efficient
    if not study.strategies:
        raise ConfigError("studies.parameter_efficient.strategies", "is empty: there is nothing to time")
    report = dataclasses.replace(params.report, baseline=next(iter(study.strategies)))
    studies = dataclasses.replace(params.studies, parameter_efficient=dataclasses.replace(study, run=()))
    return dataclasses.replace(params, variants=dict(study.strategies), report=report, studies=studies)


def _commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    return "unknown"


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the short measurements")
    parser.add_argument(
        "--sections",
        default="compute,strategies,large",
        help="comma-separated subset of compute,strategies,large (default: all)",
    )
    parser.add_argument("--tune-trials", type=int, default=3)
    parser.add_argument("--large-images", type=int, default=10_000, help="size of the estimated large study")
    parser.add_argument("--large-size", type=int, default=224)
    parser.add_argument("--synthetic-images", type=int, default=10_000)
    parser.add_argument("--end-to-end", action="store_true", help="only the end-to-end section (about 70 min)")
    parser.add_argument("--numerics", action="store_true", help="only the XLA / mixed-precision section (~5 min)")
    parser.add_argument("--tune", action="store_true", help="only tune trials/min per strategy (~7 min)")
    parser.add_argument("--folders", action="store_true", help="only reading camera-size JPEG folders (~3 min)")
    parser.add_argument(
        "--parameter-efficient",
        action="store_true",
        help="only the strategies section, for studies.parameter_efficient's strategies (~8 min)",
    )
    parser.add_argument("--keep", type=Path, help="with --end-to-end: move the finished copy here")
    parser.add_argument("--section-out", type=Path, help=argparse.SUPPRESS)  # internal: one section's JSON
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)  # internal: shared feature cache
    return parser.parse_args(argv)


def _load(args):
    """(params, prepared splits, summary) of the prepared data the benchmark measures on."""
    from pipeline.core.data import load_split, load_summary
    from pipeline.core.fit import Splits

    params = load_params(args.params)
    splits = Splits(*(load_split(args.prepared, s) for s in ("train", "val", "test")))
    return params, splits, load_summary(args.prepared)


def _numerics(args) -> list[dict]:
    from pipeline.core.weights import load_base_weights

    params, splits, summary = _load(args)

    def weights_for(variant: str):
        return load_base_weights(params.variant_weights(variant))

    return numerics_options(params, weights_for, splits, summary["data_sha256"], len(summary["class_names"]), 3)


def _sections_in_processes(args, argv: list[str] | None) -> dict:
    """Every in-process section in its own process: Keras does not free trained models
    (keras-team/keras#17458), so one process would carry every earlier section's memory into the
    next one's figures."""
    bench: dict = {}
    with tempfile.TemporaryDirectory(prefix="vgg16-bench-") as scratch:
        for section in args.sections.split(","):
            part = Path(scratch) / f"{section}.json"
            internal = ["--sections", section, "--section-out", str(part), "--cache-dir", str(Path(scratch) / "cache")]
            subprocess.run(
                [sys.executable, "-m", "pipeline.tools.bench", *(argv or sys.argv[1:]), *internal], check=True
            )
            bench.update(json.loads(part.read_text()))
    return bench


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    ensure_writable(args.out, "--out")
    header = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": _commit()}
    if args.section_out:
        write_json(args.section_out, run_sections(args))
        return
    if args.end_to_end:
        write_json(args.out / "benchmark_e2e.json", {**header, **end_to_end(max(3, args.repeats), args.keep)})
    elif args.numerics:
        write_json(args.out / "benchmark_numerics.json", {**header, "rows": _numerics(args)})
    elif args.tune:
        with tempfile.TemporaryDirectory(prefix="vgg16-bench-") as cache:
            rows = tune_rates(load_params(args.params), args.prepared, Path(cache), args.tune_trials)
        write_json(args.out / "benchmark_tune.json", {**header, "rows": rows})
    elif args.parameter_efficient:
        args.sections = "strategies"
        bench = {**header, **_sections_in_processes(args, argv)}
        write_json(args.out / "benchmark_parameter_efficient.json", bench)
    elif args.folders:
        from pipeline.tools.bench.folders import measure as folder_rates

        sizes = tuple(sorted({load_params(args.params).data.image_size, 224}))
        write_json(args.out / "benchmark_folders.json", {**header, **folder_rates(sizes, args.repeats)})
    else:
        start = time.perf_counter()
        machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
        bench = {**header, "machine": machine, **_sections_in_processes(args, argv)}
        write_json(args.out / "benchmark.json", {**bench, "seconds": time.perf_counter() - start})
    suffixes = ("", "_e2e", "_numerics", "_tune", "_folders", "_parameter_efficient")
    parts = [args.out / f"benchmark{suffix}.json" for suffix in suffixes]
    document = render(*(json.loads(path.read_text()) if path.is_file() else None for path in parts))
    write_text(args.out / "benchmark.md", document)
    print(f"[bench] wrote {args.out / 'benchmark.md'}")


if __name__ == "__main__":
    run_stage(main)
