"""Running Triton kernels on CPU in tests: Triton's interpreter, which must be on before triton is imported.

Owns: `late()` (can this process not run the kernels on CPU tensors: was triton imported before the
interpreter was enabled, or kiln's policy read without `triton_cpu`?), the autouse fixture `triton_on_cpu`
(skips a kernel file's tests in such a process — `rerun_in_fresh_process` then runs that file again, with
TRITON_INTERPRET=1 and KILN_TRITON_CPU=1 set from the start, so that kiln.policy.DEFAULT routes CPU tensors
to the kernels), and `run_interpreted(code)` (a snippet in such a fresh process, its stdout back).
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


def rerun_in_fresh_process(test_file: str) -> None:
    """Run the test file `test_file` again with the interpreter and the kernels for CPU tensors on from
    the start; fail with its output."""
    env = dict(os.environ, TRITON_INTERPRET="1", KILN_TRITON_CPU="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                       env=env, cwd=Path(test_file).parent.parent, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def run_interpreted(code: str, timeout: int) -> str:
    """Python `code` in a fresh process (cwd tests/) with the interpreter on and CPU tensors routed to the
    kernels; asserts it exits 0 and returns its stdout."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", KILN_TRITON_CPU="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout
