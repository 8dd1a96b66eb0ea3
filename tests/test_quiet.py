"""TensorFlow's start-up noise is filtered line by line at the file-descriptor level; everything
else written to stderr in that window (a real error) still reaches the terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.runtime.quiet import NOISE, filtered_stderr
from tests.conftest import REPO

NOISY = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795871750.265697   29188 port.cc:153] oneDNN custom operations are on. You may see slightly",
    "I0000 00:00:1795871750.266030   29188 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.",
    "E0000 00:00:1795871753.471443   29188 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    "call to cuInit: UNKNOWN ERROR (303)",
    "I0000 00:00:1795871750.307785   29188 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    "appropriate compiler flags.",
]


def test_noise_lines_are_dropped_and_everything_else_passes(capfd):
    with filtered_stderr():
        for line in NOISY:
            os.write(2, (line + "\n").encode())
        os.write(2, b"E0000 something.cc:12] a real failure: out of memory\n")
        os.write(2, b"a warning line\n")
    err = capfd.readouterr().err
    assert err == "E0000 something.cc:12] a real failure: out of memory\na warning line\n"
    assert all(NOISE.search(line) for line in NOISY)


def test_a_pipeline_process_imports_tensorflow_quietly():
    """Without TF_CPP_MIN_LOG_LEVEL: importing the package, then TensorFlow, prints nothing."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PIPELINE_TF_LOGS")}
    code = "import pipeline.stages, tensorflow as tf; tf.constant(1.0) + 1; print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout == "ok\n"
    if not any(os.path.exists(f"/dev/nvidia{i}") for i in range(8)):  # with a GPU, TensorFlow's lines stay
        assert result.stderr == "", result.stderr


FAKE_TENSORFLOW = """
import os
os.write(2, b"{noise}\\n")
os.write(2, b"F0000 fake.cc:1] Check failed: the reason this import crashed\\n")
os.write(2, b"no newline before the crash")
{end}
"""


def _import_fake_tensorflow(tmp_path, end: str) -> subprocess.CompletedProcess:
    """A process that imports `pipeline`, then a `tensorflow` that writes noise and a real line to
    fd 2 and ends with `end`."""
    package = tmp_path / "tensorflow"
    package.mkdir()
    (package / "__init__.py").write_text(FAKE_TENSORFLOW.format(noise=NOISY[3], end=end))
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_TF_LOGS"}
    code = f"import sys; import pipeline.stages; sys.path.insert(0, {str(tmp_path)!r}); import tensorflow"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_a_crash_while_tensorflow_loads_loses_no_line_of_its_stderr(tmp_path):
    """The filter is a separate process: an abort inside the import (no `finally` runs) still
    reaches the terminal, every line but the noise, the last one without its newline too."""
    if any(os.path.exists(f"/dev/nvidia{i}") for i in range(8)):
        pytest.skip("with a GPU nothing is filtered")
    result = _import_fake_tensorflow(tmp_path, "os.abort()")
    assert result.returncode == -6  # SIGABRT
    assert result.stderr == "F0000 fake.cc:1] Check failed: the reason this import crashed\nno newline before the crash"


def test_an_exception_while_tensorflow_loads_keeps_its_lines_and_traceback(tmp_path):
    if any(os.path.exists(f"/dev/nvidia{i}") for i in range(8)):
        pytest.skip("with a GPU nothing is filtered")
    result = _import_fake_tensorflow(tmp_path, "raise ImportError('broken build')")
    assert result.returncode == 1
    assert result.stderr.startswith("F0000 fake.cc:1] Check failed: the reason this import crashed\n")
    assert NOISY[3] not in result.stderr and result.stderr.rstrip().endswith("ImportError: broken build")


def test_the_noise_filter_steps_aside_when_it_cannot_start(monkeypatch, capfd):
    from pipeline.runtime import quiet

    def fail(*args, **kwargs):
        raise OSError("no process")

    monkeypatch.setattr(subprocess, "Popen", fail)
    before = sorted(os.listdir("/proc/self/fd"))
    with quiet.filtered_stderr():
        os.write(2, b"a line\n")
    assert capfd.readouterr().err == "a line\n" and sorted(os.listdir("/proc/self/fd")) == before


def test_the_filter_is_opt_in_a_stage_installs_it_the_core_does_not():
    code = (
        "import sys; import pipeline.core.params; from pipeline.runtime import quiet; "
        "hooked = lambda: any(isinstance(f, quiet._QuietTensorFlow) for f in sys.meta_path); "
        "print(hooked()); import pipeline.stages; print(hooked())"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["False", "True"], result.stderr
