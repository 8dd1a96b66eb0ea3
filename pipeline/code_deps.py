"""The source files of `pipeline/` that a stage's outputs depend on, found by reading the code.

A stage's code is its entry module (`python -m pipeline.<module>`) and every module it imports
inside this package, at module level or inside a function, transitively (`ast`, nothing is
imported). `tests/test_dvc_deps.py` checks that dvc.yaml declares exactly these files for every
stage, and the tune stage's study identity hashes the same files, so neither can drift from the code.

Modules that only observe a run are not followed: a change there cannot change an output, and
declaring them would make DVC rerun every training for, say, a new MLflow metric name.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
OBSERVERS = frozenset(
    {
        "__init__",  # installs the log filter
        "quiet",  # filters TensorFlow's start-up log lines
        "cli",  # turns errors into one `error:` paragraph and an exit status
        "errors",  # exception classes and their messages
        "atomic",  # writes files whole (temporary file, then rename): the bytes are the caller's
        "tracking",  # mirrors runs to MLflow
        "code_deps",  # this module: computes the study identity, not a trial's value
        "param_reads",  # records which params a stage reads (tests/test_pipeline_dvc.py)
    }
)
# ...except where the observation is the output: the register stage's output is the MLflow
# registry entry that `tracking` (and the serving code it logs) creates
OUTPUT_OF = {"register": frozenset({"tracking"})}


@cache
def imports_of(module: str) -> frozenset[str]:
    """The `pipeline` modules `module` imports anywhere in its source."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(), filename=f"pipeline/{module}.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "pipeline":  # from pipeline import x, y
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("pipeline."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("pipeline."))
    return frozenset(name for name in found if (PACKAGE / f"{name}.py").is_file())


def stage_modules(entry: str) -> list[str]:
    """`entry` and the modules it reaches through imports, not following observers."""
    followed = OBSERVERS - OUTPUT_OF.get(entry, frozenset())
    seen, todo = {entry}, [entry]
    while todo:
        for name in imports_of(todo.pop()):
            if name not in seen and name not in followed:
                seen.add(name)
                todo.append(name)
    return sorted(seen)


def stage_files(entry: str) -> list[str]:
    """The repository-relative paths of `stage_modules(entry)`, as dvc.yaml lists them."""
    return [f"pipeline/{name}.py" for name in stage_modules(entry)]
