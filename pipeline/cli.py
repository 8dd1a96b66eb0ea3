"""Entry-point glue shared by the stages: turn user errors into a clean message and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from pipeline.errors import PipelineError


def run_stage(main: Callable[[], None]) -> None:
    """Call a stage's `main()`; a PipelineError prints `error: ...` (no traceback) and exits 2."""
    try:
        main()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: outputs of this stage were not written", file=sys.stderr)
        sys.exit(130)
