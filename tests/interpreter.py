"""Running Triton kernels on CPU in tests: Triton's interpreter, which must be on before triton is imported.

Owns: `late()` (can this process not run the kernels on CPU tensors: was triton imported before the
interpreter was enabled, or kiln's policy read without `triton_cpu`?), the autouse fixture `triton_on_cpu`
(skips a kernel file's tests in such a process — `rerun_in_fresh_process` then runs that file again, with
TRITON_INTERPRET=1 and KILN_TRITON_CPU=1 set from the start, so that kiln.policy.DEFAULT routes CPU tensors
to the kernels), and `run_interpreted(code)` (a snippet in such a fresh process, its stdout back); both
wait for a run `start_background` began when the session was collected (conftest.py: tests marked
`interpreted`), else start it themselves.
Not: any kernel's expectations (each test file's own).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def late() -> bool:
    """No GPU, and either triton's library functions were compiled for the GPU (imported before the
    interpreter) or kiln's policy was read with the kernels off for CPU tensors (KILN_TRITON_CPU unset)."""
    import triton

    from kiln.policy import DEFAULT
    return not torch.cuda.is_available() and (
        type(triton.language.sum).__name__ != "InterpretedFunction" or not DEFAULT.triton_cpu)


@pytest.fixture(autouse=True)
def triton_on_cpu(request):
    if late() and request.node.originalname != "test_in_a_fresh_process":
        pytest.skip("this process cannot run the kernels on CPU tensors; see test_in_a_fresh_process")


# Interpreted runs are single-threaded Python for minutes: started in the background as soon as the session
# knows it will need them (`start_background`, from conftest's collection hook), they overlap the rest of
# the run; a test then waits for its own. Without a start (a single test run by hand) a test runs it itself.
_JOBS: dict[str, tuple[subprocess.Popen, object, object]] = {}
_ENV = dict(TRITON_INTERPRET="1", KILN_TRITON_CPU="1")


def _argv(kind: str, what: str) -> tuple[list[str], Path]:
    if kind == "file":
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", what], Path(what).parent.parent
    return [sys.executable, "-c", what], Path(__file__).parent


def _start(kind: str, what: str, threads: int | None = None) -> None:
    if f"{kind}\0{what}" in _JOBS:
        return
    import tempfile
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    argv, cwd = _argv(kind, what)
    env = dict(os.environ, **_ENV, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    _JOBS[f"{kind}\0{what}"] = (subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err, text=True), out, err)


def start_background(kind: str, what: str) -> None:
    """Start an interpreted run now (kind "file": a test file rerun; "code": a snippet), one thread each."""
    _start(kind, what, threads=1)


def stop_background() -> None:
    """Kill the runs no test waited for (a session cut short)."""
    while _JOBS:
        _JOBS.popitem()[1][0].kill()


def _result(kind: str, what: str, timeout: int | None) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the run, started here if nothing started it."""
    _start(kind, what)
    proc, out, err = _JOBS.pop(f"{kind}\0{what}")
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out.seek(0)
    err.seek(0)
    return proc.returncode, out.read(), err.read()


def rerun_in_fresh_process(test_file: str) -> None:
    """Run the test file `test_file` again with the interpreter and the kernels for CPU tensors on from
    the start; fail with its output."""
    rc, out, err = _result("file", str(test_file), None)
    assert rc == 0, out[-3000:] + err[-3000:]


def run_interpreted(code: str, timeout: int) -> str:
    """Python `code` in a fresh process (cwd tests/) with the interpreter on and CPU tensors routed to the
    kernels; asserts it exits 0 and returns its stdout."""
    pytest.importorskip("triton")
    rc, out, err = _result("code", code, timeout)
    assert rc == 0, err[-3000:]
    return out
