"""Entry-point glue shared by the stages: turn user errors into a clean message and exit 2."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from pipeline.errors import PipelineError


def run_stage(main: Callable[[], None]) -> None:
    """Call a stage's `main()`; a PipelineError prints `error: ...` (no traceback) and exits 2.

    SIGTERM (what `kill` and job schedulers send) is raised as KeyboardInterrupt, so open MLflow
    runs end KILLED and atomic outputs are cleaned up as on Ctrl-C.
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        main()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: outputs of this stage were not written", file=sys.stderr)
        sys.exit(130)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
