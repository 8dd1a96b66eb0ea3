"""Entry-point glue shared by the stages: turn user errors into a clean message and exit 2; the
command-line arguments that choose a strategy."""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.runtime.errors import PipelineError


def run_stage(main: Callable[[], None]) -> None:
    """Call a stage's `main()`; a PipelineError prints `error: ...` (no traceback) and exits 2.

    SIGTERM (what `kill` and job schedulers send) is raised as KeyboardInterrupt, so open MLflow
    runs end KILLED and atomic outputs are cleaned up as on Ctrl-C.
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)
    start = time.perf_counter()
    status = 1
    try:
        main()
        status = 0
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        status = 2
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: outputs of this stage were not written", file=sys.stderr)
        status = 130
        sys.exit(130)
    finally:
        _record_usage(time.perf_counter() - start, status)


def _record_usage(seconds: float, status: int) -> None:
    """With `PIPELINE_USAGE_LOG` set (the benchmark sets it), append this stage's wall time and
    peak resident memory (its own, and that of its largest child, e.g. a tune worker) as a
    JSON line."""
    path = os.environ.get("PIPELINE_USAGE_LOG")
    if not path:
        return
    entry = Path(sys.argv[0])  # pipeline/stages/train.py, or pipeline/stages/report/__main__.py for a package
    record = {
        "argv": [entry.parent.name if entry.stem == "__main__" else entry.stem, *sys.argv[1:]],
        "seconds": round(seconds, 3),
        "status": status,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "max_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def add_strategy_arguments(parser: argparse.ArgumentParser) -> None:
    """The strategy a tune or train stage runs, one of: a named one (`--variant`), the depth
    sweep's top<K> (`--depth`, with `--cut`), a parameter-efficient study's (`--parameter-efficient`).
    `pipeline.core.params.Params.select` turns them into the params of that one strategy."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--variant", help="a key of params.yaml `variants`")
    which.add_argument("--depth", type=int, help="the depth sweep's strategy top<K>: train the top K conv layers")
    which.add_argument(
        "--parameter-efficient", metavar="NAME", help="a key of params.yaml studies.parameter_efficient.strategies"
    )
    parser.add_argument(
        "--cut", help="with --depth: the base ends after this block (studies.depth.cut_after; default block5, no cut)"
    )


def strategy_argv(args: argparse.Namespace) -> list[str]:
    """The flags `add_strategy_arguments` parsed, as a child process's command line needs them."""
    if args.depth is not None:
        return ["--depth", str(args.depth), *(["--cut", args.cut] if args.cut else [])]
    if args.parameter_efficient is not None:
        return ["--parameter-efficient", args.parameter_efficient]
    return ["--variant", args.variant]
