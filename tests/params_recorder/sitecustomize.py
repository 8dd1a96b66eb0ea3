"""Loaded by Python at start-up in processes the tests start with `param_reads.environment(...)`:
turns the params recorder (tests/param_reads.py) on. The pipeline itself never imports it."""

import os
import sys

if os.environ.get("PIPELINE_PARAMS_READS"):
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [os.getcwd(), tests]  # the repository the process runs in (its `pipeline`), tests/
    import param_reads

    sys.path.remove(tests)
    param_reads.install()
