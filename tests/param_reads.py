"""Which params.yaml keys a stage reads: the evidence behind dvc.yaml's `params:` lists.

Test instrumentation, never imported by the pipeline: a process started with `environment(folder)`
(PIPELINE_PARAMS_READS=<folder>, and tests/params_recorder on PYTHONPATH, whose sitecustomize calls
`install_on_import()`) gets from `load_params` a params object whose every value read is recorded
under its full key (`train.max_epochs`, `variants.frozen.trainable`); at exit the process writes
`<folder>/<stage>-<pid>.json` with the stage's name (DVC's `DVC_STAGE`, else its module), its
command line and the keys read.

Two checks read the records: every stage process the tests start records into one folder per test
session (`tests/conftest.py` `stage_env`), and the last test of the session
(`test_params_declared.py`) fails naming any key a stage read but dvc.yaml does not declare for
it; the slow `tests/test_pipeline_dvc.py` runs the whole DAG this way and also fails naming a
declared key that no run read.

A read counts when the code that makes it is the stage's own: reads from the modules that only
observe a run (`code_deps.is_observer`, e.g. `tracking` logging every setting to MLflow) do not,
as such a value cannot change an output.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.abc
import os
import sys
from pathlib import Path

import yaml

ENV = "PIPELINE_PARAMS_READS"
SITE = Path(__file__).resolve().parent / "params_recorder"  # its sitecustomize.py calls install()
# id(section) -> (section, its key prefix, the fields that hold no params.yaml value): kept here,
# not on the instances, whose __dict__ the stages log to MLflow
_labels: dict[int, tuple[object, str, frozenset[str]]] = {}
_reads: set[str] = set()
_paused = 0
_entry_now = ""  # set by `record`


def environment(folder: Path, base: dict | None = None) -> dict:
    """`base` (default: this process's environment) with the recorder on, writing into `folder`."""
    env = dict(os.environ if base is None else base)
    env[ENV] = str(folder)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH")]))
    return env


def install_on_import() -> None:
    """`install()` as soon as this process imports `pipeline.core.params` (nothing before: a process
    that never imports the pipeline is untouched)."""
    if not any(isinstance(finder, _PatchParams) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchParams())


class _PatchParams(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pipeline.core.params":
            return None
        sys.meta_path.remove(self)  # once per process
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                spec.loader.exec_module = _then_install(spec.loader.exec_module)
                return spec
        return None


def _then_install(execute):
    def exec_module(module):
        execute(module)
        install(module)

    return exec_module


def install(module=None) -> None:
    """Record the reads of every params object `load_params` (of `module`, default
    `pipeline.core.params`) returns in this process; the studies' copies (`Params.with_depth`,
    `Params.with_study_strategy`) record under the keys they were copied from."""
    if module is None:
        from pipeline.core import params as module

    load = module.load_params

    def recorded_load(*args, **kwargs):
        return record(load(*args, **kwargs))

    module.load_params = recorded_load
    module.Params.with_depth = _recording_copy(module.Params.with_depth, _derive_depth)
    module.Params.with_study_strategy = _recording_copy(module.Params.with_study_strategy, _derive_study)
    _watch_exit_status()


def _recording_copy(method, derive_copy):
    """`method` (a Params method returning (a copy, a name)) with its `dataclasses.replace` calls
    paused (copying is no use of a value: the copies record their own reads) and the copy's
    sections labelled by `derive_copy(copy, original)`. Its other reads are recorded."""

    def recorded(self, *args, **kwargs):
        replace = dataclasses.replace

        def paused_replace(*args, **kwargs):
            with paused():
                return replace(*args, **kwargs)

        dataclasses.replace = paused_replace
        try:
            copy, name = method(self, *args, **kwargs)
        finally:
            dataclasses.replace = replace
        with paused():
            derive_copy(copy, self)
        return copy, name

    return recorded


def _derive_depth(copy, original) -> None:
    derive(copy.report, original.report, {"baseline"})
    derive(copy, original)


def _derive_study(copy, original) -> None:
    """The study's strategy keeps its own labels (studies.parameter_efficient.strategies.<name>)."""
    _derive_depth(copy, original)
    derive(copy.studies, original.studies, {"parameter_efficient"})
    derive(copy.studies.parameter_efficient, original.studies.parameter_efficient, {"run"})


_status = {"code": 0}  # how the process ends: a failed stage writes no output, so its reads count for nothing


def _watch_exit_status() -> None:
    exit_, excepthook = sys.exit, sys.excepthook

    def recorded_exit(code=0):
        _status["code"] = code if isinstance(code, int) else 1
        exit_(code)

    def recorded_excepthook(*exc_info):
        _status["code"] = 1
        excepthook(*exc_info)

    sys.exit, sys.excepthook = recorded_exit, recorded_excepthook


def _entry_module() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name.removeprefix("pipeline.").removesuffix(".__main__") if spec else ""


def _made_by_an_observer(entry: str) -> bool:
    """True when the nearest `pipeline` code on the stack (the stage's own `__main__` included) is
    an observing module, or when the recorder itself made the read (`_is_section` asking a
    mapping for its length)."""
    from pipeline.runtime import code_deps

    frame = sys._getframe(3)  # 0: here, 1: _record, 2: the recording method, 3: the reader
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module == __name__:
            return True
        if module == "__main__":
            return False
        if module.startswith("pipeline."):
            return code_deps.is_observer(module.removeprefix("pipeline."), entry)
        frame = frame.f_back
    return False


def _is_section(value: object) -> bool:
    """A dataclass (a params section) or a mapping of them (`variants`): not a value by itself."""
    if dataclasses.is_dataclass(value):
        return True
    return isinstance(value, dict) and bool(value) and all(dataclasses.is_dataclass(v) for v in dict.values(value))


def _recording_getattribute(self, name: str):
    value = object.__getattribute__(self, name)
    if name.startswith("_") or name not in object.__getattribute__(self, "__dataclass_fields__"):
        return value
    _, prefix, derived = _labels.get(id(self), (None, None, ()))
    if prefix is None or name in derived or _is_section(value):
        return value  # no params.yaml value (made by the code), or a section, not a value
    _record(prefix + name)
    return value


def _record(key: str) -> None:
    if not _paused and not _made_by_an_observer(_entry_now):
        _reads.add(key)


class _Mapping(dict):
    """A mapping section (`variants`) that records its key when code goes through all its entries
    (the set of strategies is then what was read); looking one entry up records nothing."""

    key = ""

    def __iter__(self):
        _record(self.key)
        return super().__iter__()

    def keys(self):
        _record(self.key)
        return super().keys()

    def values(self):
        _record(self.key)
        return super().values()

    def items(self):
        _record(self.key)
        return super().items()

    def __len__(self):
        _record(self.key)
        return super().__len__()


def _label(section: object, prefix: str, classes: set[type]) -> None:
    classes.add(type(section))
    _labels[id(section)] = (section, prefix, frozenset())
    for field in dataclasses.fields(section):
        value = object.__getattribute__(section, field.name)
        if dataclasses.is_dataclass(value):
            _label(value, f"{prefix}{field.name}.", classes)
        elif _is_section(value):
            for key, item in dict.items(value):
                _label(item, f"{prefix}{field.name}.{key}.", classes)
            mapping = _Mapping(value)
            mapping.key = prefix + field.name
            object.__setattr__(section, field.name, mapping)


def record(params: object) -> object:
    """Start recording the reads of `params` (the whole loaded params object); returns it."""
    global _entry_now
    classes: set[type] = set()
    _label(params, "", classes)
    for cls in classes:
        cls.__getattribute__ = _recording_getattribute
    _entry_now = _entry_module()
    atexit.register(_write, Path(os.environ[ENV]))
    return params


def derive(copy: object, original: object, replaced: frozenset[str] | set[str] = frozenset()) -> object:
    """Label `copy`, made from the section `original` with the fields `replaced` set by the code, so
    that reading one of the other fields records `original`'s key. Returns `copy`."""
    if id(original) in _labels:
        _labels[id(copy)] = (copy, _labels[id(original)][1], frozenset(replaced))
    return copy


@contextlib.contextmanager
def paused():
    """Reads inside are not uses (copying a section into a derived one, say)."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def _write(folder: Path) -> None:
    from pipeline.runtime.atomic import write_json

    stage = os.environ.get("DVC_STAGE") or _entry_module()
    folder.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "argv": sys.argv, "status": _status["code"], "reads": sorted(_reads)}
    write_json(folder / f"{stage.replace('/', '_')}-{os.getpid()}.json", record)


def leaf_keys(section: object, prefix: str = "") -> list[str]:
    """Every value's full key under `section` (a params object or section)."""
    keys = []
    for field in dataclasses.fields(section):
        value = object.__getattribute__(section, field.name)
        if dataclasses.is_dataclass(value):
            keys += leaf_keys(value, f"{prefix}{field.name}.")
        elif _is_section(value):
            for key, item in dict.items(value):
                keys += leaf_keys(item, f"{prefix}{field.name}.{key}.")
        else:
            keys.append(prefix + field.name)
    return keys


def definition_of(stage: str, argv: list[str]) -> str:
    """The dvc.yaml stage definition a recorded process ran: DVC's stage name without its
    foreach/matrix key, or, for a process the tests started directly, its module and flags."""
    if not stage.startswith("stages."):
        return stage.split("@")[0]
    name = stage.removeprefix("stages.")
    if name in ("train", "tune") and "--parameter-efficient" in argv:
        return f"parameter_efficient_{name}"
    if name == "train":
        return "sample_efficiency" if "--train-per-class" in argv else "depth_train" if "--depth" in argv else "train"
    if name == "tune":
        return "depth_tune" if "--depth" in argv else "tune"
    if name == "baselines":
        return "sample_efficiency_baselines" if "--train-per-class" in argv else "baselines"
    return name


def declared(dvc_yaml: Path) -> dict[str, list[str]]:
    """Each dvc.yaml stage definition's params.yaml keys (anchors resolved; a templated strategy
    `variants.${key}` as `variants.*`)."""
    import re

    out = {}
    for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        keys = []
        for entry in stage.get("do", stage).get("params", []):
            keys += [entry] if isinstance(entry, str) else [key for listed in entry.values() for key in listed]
        out[name] = [re.sub(r"\$\{[^}]*\}", "*", key) for key in keys]
    return out


def covered(key: str, patterns: list[str]) -> bool:
    """`key` is a declared key or lies under one (`*` matches one part: a strategy's name)."""
    parts = key.split(".")
    for pattern in patterns:
        wanted = pattern.split(".")
        if len(wanted) <= len(parts) and all(w in ("*", p) for w, p in zip(wanted, parts, strict=False)):
            return True
    return False


# what a training without --best-params reads instead (a test's shortcut; dvc.yaml always passes
# the tune stage's best_params.json)
UNTUNED = ("model.head_units", "train.learning_rate")


def _untuned_training(record: dict) -> bool:
    return record["stage"].split("@")[0] in ("stages.train", "train") and "--best-params" not in record["argv"]


def undeclared_reads(folder: Path, dvc_yaml: Path) -> dict[str, list[str]]:
    """{stage definition: keys its processes read (records in `folder`) that dvc.yaml does not
    declare for it}; processes of no dvc.yaml stage (a tool, a test's own code) and processes that
    failed (an error names the defined strategies, say; no output is written) are left out."""
    import json

    stages, wrong = declared(dvc_yaml), {}
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        definition = definition_of(record["stage"], record["argv"])
        if definition in stages and record.get("status", 0) == 0:
            allowed = stages[definition] + (list(UNTUNED) if _untuned_training(record) else [])
            missing = [key for key in record["reads"] if not covered(key, allowed)]
            if missing:
                wrong.setdefault(definition, set()).update(missing)
    return {name: sorted(keys) for name, keys in wrong.items()}
