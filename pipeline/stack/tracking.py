"""The one place that talks to MLflow.

Stages call `connect()` once (it fails fast on an unreachable server), open runs with `run()`
(a failure or Ctrl-C ends the run FAILED / KILLED, never RUNNING) and pass `EpochLogger` to the
training function as a plain Keras callback. The files under results/ stay the source of
truth; MLflow mirrors them for browsing and comparison.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
import platform
import re
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import keras
import mlflow
import mlflow.system_metrics

from pipeline.runtime.errors import PipelineError
from pipeline.stack import metric_names

MAX_PARAM_LENGTH = 6000  # MLflow's limit per param value
MAX_TAG_LENGTH = 5000
CHAMPION = "champion"  # the registry alias that follows the newest registration
# A/B of train@last_layers training seconds: off 27.0/29.2, every 1 s 31.5/28.1, every 10 s 29.3/28.6 (noise)
SYSTEM_METRICS_SECONDS = 1
_URL_PASSWORD = re.compile(r"(?P<prefix>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@/\s]+@")


# the system-metrics sampler announces every start and stop at INFO: two lines per run in the terminal
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
# and artifact transfers draw progress bars (the register stage logs a model): off unless asked for
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class TrackingError(PipelineError):
    """The MLflow tracking server or store cannot be reached."""


def resolve_tracking_uri(configured: str, root: str | Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else `configured` (params.yaml `mlflow.tracking_uri`).

    A relative SQLite path is made absolute against the DVC repository root: DVC passes it in
    `DVC_ROOT`, pointing at the user's repository even under `dvc exp run --temp/--queue`,
    whose temporary clone would otherwise swallow the database.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        base = Path(os.environ.get("DVC_ROOT") or root)
        uri = prefix + str((base / uri[len(prefix) :]).resolve())
    return uri


def connect(uri: str, experiment: str) -> str:
    """Point MLflow at `uri` and `experiment` (created if missing); returns the experiment id.

    Raises TrackingError naming the URI when the server does not answer within seconds.
    """
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            raise TrackingError(
                f"MLflow tracking server {uri} is not reachable ({error}). Start it (see README: "
                "`mlflow server --host 127.0.0.1 ...`) or unset MLFLOW_TRACKING_URI / change mlflow.tracking_uri"
            ) from error
    mlflow.set_tracking_uri(uri)
    try:
        if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(experiment) is None:
            # artifacts beside the database, not under the working directory: a first run from a
            # `dvc exp run --temp` clone would otherwise put them in a folder that is deleted
            artifacts = Path(uri[len("sqlite:///") :]).parent / "mlruns"
            mlflow.create_experiment(experiment, artifact_location=artifacts.as_uri())
        return mlflow.set_experiment(experiment).experiment_id
    except mlflow.exceptions.MlflowException as error:
        raise TrackingError(f"MLflow store {uri} cannot be used: {error}") from error


_settings: list = []  # the stage's params.yaml `mlflow` section, once `open_store` has run


def open_store(settings, params_file: str | Path) -> str:
    """Connect a stage to the MLflow store its params.yaml `mlflow` section names (`settings`;
    a relative SQLite path resolves against the params file's folder); returns the experiment id.
    The section's `system_metrics` then applies to the runs that ask for system metrics."""
    _settings[:] = [settings]
    return connect(resolve_tracking_uri(settings.tracking_uri, Path(params_file).resolve().parent), settings.experiment)


@contextlib.contextmanager
def run(
    name: str, *, tags: dict, params: dict | None = None, parent_run_id: str | None = None, system_metrics: bool = False
) -> Iterator[str]:
    """An MLflow run named `name`; yields its id. Ends FINISHED, FAILED on an exception, or
    KILLED on Ctrl-C / SIGTERM (the stages turn SIGTERM into KeyboardInterrupt).

    `parent_run_id` nests it under another run, also one opened by another process (tune
    workers nest their trials under the study's run this way). `system_metrics` (when
    `mlflow.system_metrics` is on) samples CPU, memory and disk into `system/...` metrics every
    SYSTEM_METRICS_SECONDS while the run is open.
    """
    nested = mlflow.active_run() is not None  # in-process trials run inside the study's run
    system_metrics = system_metrics and bool(_settings) and _settings[0].system_metrics
    if system_metrics:
        mlflow.system_metrics.set_system_metrics_sampling_interval(SYSTEM_METRICS_SECONDS)
    active = mlflow.start_run(
        run_name=name,
        nested=nested,
        parent_run_id=parent_run_id,
        tags={"mlflow.source.name": _source_name()},
        log_system_metrics=system_metrics,
    )
    try:
        _redact_automatic_tags(active.info.run_id)
        set_tags(tags)
        if params:
            log_params(params)
        yield active.info.run_id
    except KeyboardInterrupt as error:
        _end_with_reason("KILLED", f"interrupted ({error or 'Ctrl-C'})")
        raise
    except BaseException as error:
        _end_with_reason("FAILED", f"{type(error).__name__}: {error}")
        raise
    else:
        mlflow.end_run("FINISHED")


def _end_with_reason(status: str, reason: str) -> None:
    """End the active run with `status` and a `failure_reason` tag; a tracking problem here
    must not hide the error that ended the run."""
    try:
        mlflow.set_tag("failure_reason", redact(reason)[:MAX_TAG_LENGTH])
    finally:
        mlflow.end_run(status)


def redact(text: str) -> str:
    """`text` with URL passwords masked (`postgresql://user:***@host`) and the user's home
    folder written as `~`, so that logged params and tags carry no secrets or personal paths."""
    text = _URL_PASSWORD.sub(r"\g<prefix>:***@", text)
    home = str(Path.home())
    if len(home) > 1:
        text = re.sub(re.escape(home) + r"(?![\w.-])", "~", text)
    return text


def _source_name() -> str:
    """The entry point as MLflow's `mlflow.source.name` tag: relative to the working directory
    (MLflow would record the absolute script path)."""
    script = Path(sys.argv[0]).resolve()
    try:
        return script.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return redact(str(script))


def _redact_automatic_tags(run_id: str) -> None:
    """MLflow adds tags of its own (user, git commit, source); mask any secret or home path."""
    for key, value in mlflow.get_run(run_id).data.tags.items():
        if redact(value) != value:
            mlflow.set_tag(key, redact(value))


def set_tags(tags: dict) -> None:
    mlflow.set_tags({k: redact(str(v))[:MAX_TAG_LENGTH] for k, v in tags.items() if v is not None})


def log_params(params: dict) -> None:
    """Log a nested mapping flattened to dotted keys (`train.epochs`), 100 per call; strings are
    passed through `redact`."""
    flat = {k: redact(str(v))[:MAX_PARAM_LENGTH] for k, v in flatten(params).items()}
    items = sorted(flat.items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))


def log_metrics(metrics: dict, step: int | None = None) -> None:
    """Log the numeric leaves of a (nested) mapping; None values are skipped."""
    numeric = {k: float(v) for k, v in flatten(metrics).items() if _is_number(v)}
    if numeric:
        mlflow.log_metrics(numeric, step=step)


def log_artifacts(paths: list[Path], folder: str | None = None) -> None:
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=folder)


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_figure(figure, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file)


def log_datasets(source: str, name: str, digests: dict[str, str]) -> None:
    """The data a run trained and was evaluated on, as MLflow dataset inputs (the runs table's
    Dataset column and filter): one per split, `digests` {context: digest} (e.g. {"training":
    ..., "validation": ..., "test": ...}), all from `source` (a folder) under `name`."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # a local path matches two registered local sources: either is right
        warnings.simplefilter("ignore", UserWarning)
        resolved = resolve_dataset_source(redact(source))
    for context, digest in digests.items():
        mlflow.log_input(MetaDataset(source=resolved, name=name, digest=digest[:16]), context=context)


def dataset_name(summary: dict) -> str:
    """The name runs' dataset inputs carry: the source and the prepared size ("fashion_mnist-32px")."""
    return f"{summary['source']}-{summary['image_size']}px"


def split_digests(summary: dict, train_index=None) -> dict[str, str]:
    """{context: digest} of the prepared splits from the prepare stage's summary.json (sha256 of
    images and labels); a training subset (the sample-efficiency study) gets its own digest."""
    import hashlib

    def digest(split: str) -> str:
        sha = summary["sha256"][split]
        return hashlib.sha256((sha["images"] + sha["labels"]).encode()).hexdigest()

    out = {"training": digest("train"), "validation": digest("val"), "test": digest("test")}
    if train_index is not None:
        rows = ",".join(str(int(i)) for i in train_index)
        out["training"] = hashlib.sha256(f"{out['training']}:{rows}".encode()).hexdigest()
    return out


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def flatten(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def environment_tags() -> dict:
    """Git commit, library versions and machine, for every run."""
    import tensorflow as tf

    return {
        "git_commit": _git_commit(),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
    }


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


class EpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics to the active MLflow run with `step=epoch`, 1-based, named by
    `metric_names.epoch_metric`; `first_epoch` shifts steps so that several fit() calls share one
    axis. The epoch's seconds are the training function's own clock (`epoch_seconds` in the logs)."""

    def __init__(self, first_epoch: int = 1):
        super().__init__()
        self.first_epoch = first_epoch

    def on_epoch_end(self, epoch, logs=None):
        metrics = {k: float(v) for k, v in (logs or {}).items() if _is_number(v)}
        mlflow.log_metrics({metric_names.epoch_metric(k): v for k, v in metrics.items()}, step=epoch + self.first_epoch)
