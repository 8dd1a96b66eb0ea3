"""Atomic outputs: a reader (or DVC) never sees a half-written file or folder.

Write into a temporary sibling, then `os.replace` it into place; on any error (Ctrl-C
included) the temporary is removed and the previous output, if any, is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.runtime.errors import PipelineError


class OutputError(PipelineError):
    """An output folder cannot be written."""


def ensure_writable(folder: str | Path, option: str) -> None:
    """Fail before any work when files cannot be created in `folder` (created if missing).

    Probes by creating and removing a temporary folder, which also catches what permission
    bits do not show: a read-only mount, ACLs, a full quota. `option` names the command-line
    option that chooses another folder.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(dir=folder, prefix=".write-probe.")).rmdir()
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputError(
            f"cannot write into {folder} ({reason}); make it writable (e.g. `chmod -R u+w {folder}`) "
            f"or choose another folder with {option}"
        ) from error


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes))
    os.close(fd)
    tmp = Path(tmp)
    tmp.chmod(0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: object, *, sort_keys: bool = True) -> None:
    """`data` as indented JSON; `sort_keys=False` keeps the order the writer chose (e.g. values
    that reproduce first, wall-clock measurements last)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
