"""A quiet terminal on machines without a GPU: TensorFlow's start-up noise, filtered line by line.

Importing TensorFlow 2.21 on a CPU-only machine prints, before its own log level applies
(TF_CPP_MIN_LOG_LEVEL does not reach these), lines such as

    E0000 ... cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: ...
    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.

which read like failures. `install()` wraps the first import of `tensorflow` in a process that
opts in: importing a stage (`pipeline/stages/__init__.py`) or a tool (`pipeline/tools/__init__.py`)
does, and so does the registered model's code (`pipeline/stack/serving.py`); a test or a library
user importing the core does not. While TensorFlow loads and probes its devices, the
process's stderr (file descriptor 2) goes through a pipe to a separate filter process, which
writes every line that is not one of NOISE to the real stderr as it arrives. A separate process,
so that a crash while TensorFlow loads (a fatal error, an abort) loses no line: the filter still
reads what was written and forwards it when the pipe closes. Nothing else is touched: on a
machine with an NVIDIA device, or with PIPELINE_TF_LOGS=1, TensorFlow prints everything as
usual, and any other line (a real error, a warning) passes through.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import os
import re
import subprocess
import sys
from pathlib import Path

NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|\] oneDNN custom operations are on\."
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized to use available CPU instructions"
    r"|^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.$"
)


def has_nvidia_device() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


def install() -> None:
    """Filter TensorFlow's start-up noise in this process, if it has not imported TensorFlow yet
    (see the module docstring)."""
    if os.environ.get("PIPELINE_TF_LOGS") == "1" or has_nvidia_device() or "tensorflow" in sys.modules:
        return
    if not any(isinstance(finder, _QuietTensorFlow) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlow())


# the filter process: forwards its stdin to its stdout line by line, leaving out lines matching
# argv[1]; Ctrl-C is for the stage (the filter ends when the pipe closes)
FILTER = """
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
noise = re.compile(sys.argv[1])
for line in sys.stdin.buffer:
    if not noise.search(line.decode(errors="replace")):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
"""
FILTER_EXIT_SECONDS = 5  # a child started inside the block may hold the pipe open; the filter then ends with it


@contextlib.contextmanager
def filtered_stderr():
    """Inside the block, file descriptor 2 writes into a pipe read by a filter process (FILTER)
    whose output is the real stderr; afterwards fd 2 is restored and the filter, having read to the
    end, exits. When the filter cannot start, the block runs unfiltered."""
    sys.stderr.flush()
    saved = os.dup(2)
    read, write = os.pipe()  # not inheritable: the filter holds no write end
    try:
        forwarder = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", FILTER, NOISE.pattern], stdin=read, stdout=saved
        )
    except OSError:
        os.close(write)
        os.close(saved)
        forwarder = None
    finally:
        os.close(read)
    if forwarder is None:
        yield
        return
    os.dup2(write, 2)
    os.close(write)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the last write end closes: the filter reads to the end and exits
        os.close(saved)
        with contextlib.suppress(subprocess.TimeoutExpired):
            forwarder.wait(timeout=FILTER_EXIT_SECONDS)


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` through the other finders and wraps its loader in `filtered_stderr`."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once per process
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # everything else (resource readers, get_code, ...) is the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with filtered_stderr():
            self.loader.exec_module(module)
            module.config.list_physical_devices()  # the CUDA probe, which prints the cuInit line
