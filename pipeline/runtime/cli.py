"""Entry-point glue shared by the stages: turn user errors into a clean message and exit 2."""

from __future__ import annotations

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
