"""Loaded by Python at start-up in processes the tests start with `param_reads.environment(...)`:
turns the params recorder (tests/param_reads.py) on once the process imports the pipeline's
params module. The pipeline itself never imports it."""

import os
import sys

if os.environ.get("PIPELINE_PARAMS_READS"):
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, tests)
    import param_reads

    sys.path.remove(tests)
    param_reads.install_on_import()
