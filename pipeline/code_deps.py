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


def source(module: str) -> Path | None:
    """The file of `module` (dotted, inside `pipeline`: "train", "report.figures"; a package is its
    `__init__.py`), or None when there is no such module."""
    path = PACKAGE.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


@cache
def imports_of(module: str) -> frozenset[str]:
    """The `pipeline` modules `module` imports anywhere in its source, with the packages they are
    in (importing `pipeline.report.figures` runs `pipeline/report/__init__.py` first)."""
    path = source(module)
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "pipeline":
            base = node.module.removeprefix("pipeline").lstrip(".")
            for alias in node.names:  # `from pipeline.report import figures`: a module or a name in one
                candidate = f"{base}.{alias.name}".lstrip(".")
                found.add(candidate if source(candidate) else base)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("pipeline.") for a in node.names if a.name.startswith("pipeline."))
    with_packages = {".".join(name.split(".")[:i]) for name in found for i in range(1, name.count(".") + 2)}
    return frozenset(name for name in with_packages if name and source(name))


def stage_modules(entry: str) -> list[str]:
    """`entry` (with its `__main__` when it is a package run by `python -m`) and the modules it
    reaches through imports, not following observers."""
    followed = OBSERVERS - OUTPUT_OF.get(entry, frozenset())
    seen = {entry} | ({f"{entry}.__main__"} if source(f"{entry}.__main__") else set())
    todo = list(seen)
    while todo:
        for name in imports_of(todo.pop()):
            if name not in seen and name not in followed:
                seen.add(name)
                todo.append(name)
    return sorted(seen)


def stage_files(entry: str) -> list[str]:
    """The repository-relative paths of `stage_modules(entry)`, as dvc.yaml lists them."""
    return sorted(str(source(name).relative_to(PACKAGE.parent)) for name in stage_modules(entry))


def main() -> None:
    """Print every stage's code dependencies (what dvc.yaml must list), to paste after a refactor."""
    import re

    import yaml

    stages = yaml.safe_load((PACKAGE.parent / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        entry = re.search(r"python -m pipeline\.(\w+)", stage.get("do", stage)["cmd"]).group(1)
        print(f"{name}:", *(f"  - {path}" for path in stage_files(entry)), sep="\n")


if __name__ == "__main__":
    main()
