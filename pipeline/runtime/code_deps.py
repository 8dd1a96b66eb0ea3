"""The source files of `pipeline/` that a stage's outputs depend on, found by reading the code.

A stage's code is its entry module (`python -m pipeline.stages.<name>`) and every module it
imports inside this package, at module level or inside a function, transitively (`ast`, nothing
is imported). The tune stage's study identity hashes exactly these files.

dvc.yaml declares them coarser, by folder: a stage that trains depends on `pipeline/core` as a
whole, plus its own module and the few adapters it uses, so a new module in the core needs no
dvc.yaml edit (the price: changing any core module reruns every stage that depends on the core).
`coverage_problems` is the check, run by tests/test_dvc_deps.py in the default suite: every file
of a stage's code lies under a declared entry, and every declared entry holds some of it.

Modules that only observe a run are not followed: a change there cannot change an output, and
declaring them would make DVC rerun every training for, say, a new MLflow metric name.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
# modules that only observe a run; every module of `runtime/` is one (command line, errors, atomic
# writes, the log filter, this module, which computes the study identity, not a trial's value)
OBSERVERS = frozenset(
    {
        "stages",  # `stages/__init__.py`: installs the log filter
        "stack.tracking",  # mirrors runs to MLflow
        "stack.metric_names",  # what the numbers are called in MLflow
    }
)
OBSERVING_PACKAGES = ("runtime",)
# ...except where the observation is the output: the register stage's output is the MLflow
# registry entry that `tracking` (and the serving code it logs) creates
OUTPUT_OF = {"stages.register": frozenset({"stack.tracking", "stack.metric_names"})}  # registry: not an observer


def is_observer(module: str, entry: str = "") -> bool:
    """True when `module` (dotted, inside `pipeline`) cannot change the outputs of the stage `entry`."""
    if module in OUTPUT_OF.get(entry, frozenset()):
        return False
    return module in OBSERVERS or module.split(".")[0] in OBSERVING_PACKAGES or _inert(module)


def _inert(module: str) -> bool:
    """A package's `__init__.py` that holds only a docstring (importing it runs nothing)."""
    path = source(module)
    if path is None or path.name != "__init__.py":
        return False
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


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
    in (importing `pipeline.stages.report.figures` runs `pipeline/stages/report/__init__.py` first)."""
    path = source(module)
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "pipeline":
            base = node.module.removeprefix("pipeline").lstrip(".")
            for alias in node.names:  # `from pipeline.stages.report import figures`: a module or a name in one
                candidate = f"{base}.{alias.name}".lstrip(".")
                found.add(candidate if source(candidate) else base)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("pipeline.") for a in node.names if a.name.startswith("pipeline."))
    with_packages = {".".join(name.split(".")[:i]) for name in found for i in range(1, name.count(".") + 2)}
    return frozenset(name for name in with_packages if name and source(name))


def stage_modules(entry: str) -> list[str]:
    """`entry` (with its `__main__` when it is a package run by `python -m`) and the modules it
    reaches through imports, not following observers."""
    seen = {entry} | ({f"{entry}.__main__"} if source(f"{entry}.__main__") else set())
    todo = list(seen)
    while todo:
        for name in imports_of(todo.pop()):
            if name not in seen and not is_observer(name, entry):
                seen.add(name)
                todo.append(name)
    return sorted(seen)


def stage_files(entry: str) -> list[str]:
    """The repository-relative paths of `stage_modules(entry)`, as dvc.yaml lists them."""
    return sorted(str(source(name).relative_to(PACKAGE.parent)) for name in stage_modules(entry))


def entry_of(stage: dict) -> str:
    """The entry module (dotted, inside `pipeline`) of a dvc.yaml stage (a foreach/matrix stage's
    `do:` or the stage itself)."""
    import re

    return re.search(r"python -m pipeline\.([\w.]+)", stage.get("do", stage)["cmd"]).group(1)


def coverage_problems(declared: list[str], entry: str) -> list[str]:
    """What is wrong with `declared` (a stage's dvc.yaml deps under pipeline/: files or folders) as
    the code of `entry`: files of its code no entry covers, entries that cover none of it."""
    files = stage_files(entry)

    def covers(dep: str, path: str) -> bool:
        return path == dep or path.startswith(dep.rstrip("/") + "/")

    missing = [f"not declared: {path}" for path in files if not any(covers(dep, path) for dep in declared)]
    unused = [f"declared but not its code: {dep}" for dep in declared if not any(covers(dep, f) for f in files)]
    return missing + unused


def main() -> None:
    """Print every stage's code (the files its outputs depend on) and what dvc.yaml gets wrong."""
    import yaml

    stages = yaml.safe_load((PACKAGE.parent / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        entry = entry_of(stage)
        declared = [d for d in stage.get("do", stage)["deps"] if isinstance(d, str) and d.startswith("pipeline/")]
        print(f"{name} ({entry}):", *(f"  - {path}" for path in stage_files(entry)), sep="\n")
        for problem in coverage_problems(declared, entry):
            print(f"  ! {problem}")


if __name__ == "__main__":
    main()
