"""Runtime switches: which kernels kiln may use, read from the environment once.

Owns: `Policy` (a frozen dataclass, one field per `KILN_*` kernel switch), `Policy.from_env()`,
`SWITCHES` (each field's variable and meaning, the list the README prints) and `DEFAULT`, the policy of
this process, read from the environment when kiln is imported.
Not: the decisions themselves (quant/route.py for matmuls, ops/ for attention and the CPU backend).

Code that chooses a kernel takes a `policy` argument (default `DEFAULT`) or reads the one its model or
layer was built with; tests pass a `Policy(...)` instead of patching modules or the environment. Paths
and locations (`KILN_HOME`, `KILN_TEST_MODELS`) are not kernel switches and are read where they are used.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

from kiln.errors import KilnError

# field: (environment variable, what setting it does)
SWITCHES = {
    "int8": ("KILN_INT8", "0: GPU GEMVs keep activations in floating point (no int8 dp4a path)"),
    "mma": ("KILN_MMA", "0: 9..32-row GPU matmuls never use the tensor-core tiles (dequantize + cuBLAS)"),
    "pdl": ("KILN_PDL", "0: Triton kernels launch without programmatic dependent launch"),
    "native": ("KILN_NATIVE", "0: the CPU decode step uses torch's kernels, not kiln's C kernels"),
    "native_step": ("KILN_NATIVE_STEP", "0: a CPU decode step calls the C kernels block by block from Python, "
                                        "not once for every block"),
    "attn_splits": ("KILN_ATTN_SPLITS", "N: split-KV decode attention uses N splits (default: by occupancy and "
                                        "cache length)"),
    "rope_attn": ("KILN_ROPE_ATTN", "0: a GPU decode step's RoPE, q/k norms and KV write run in a kernel of their own "
                                    "before split-KV attention at head dim 128 too, not inside it"),
    "pair_gemv": ("KILN_PAIR_GEMV", "0: a decode step's q/k/v projections of two GGUF types take two GEMV launches, "
                                    "not one"),
    "gemv_rope": ("KILN_GEMV_ROPE", "0: a GPU decode step's RoPE and KV write for a model without q/k norms at a head "
                                    "dim other than 128 run in a kernel of their own, not in the q/k/v GEMV"),
    "amx": ("KILN_AMX", "0: a CPU prompt's quantized matmuls stay float32 over the exact weights where the CPU has AMX "
                        "bf16 tiles, not bfloat16 through them"),
    "huge_pages": ("KILN_HUGE_PAGES", "1: compact CPU weights move into transparent huge pages at load (slower load, "
                                      "faster decode)"),
    "triton_cpu": ("KILN_TRITON_CPU", "1: run the Triton kernels on CPU tensors too (tests, with "
                                      "TRITON_INTERPRET=1)"),
}


@dataclass(frozen=True)
class Policy:
    int8: bool = True
    mma: bool = True
    pdl: bool = True
    native: bool = True
    native_step: bool = True
    attn_splits: int = 0  # 0: the default rule decides
    rope_attn: bool = True
    pair_gemv: bool = True
    gemv_rope: bool = True
    amx: bool = True
    huge_pages: bool = False
    triton_cpu: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Policy:
        """The policy the environment asks for; unset variables keep the defaults."""
        env = os.environ if env is None else env

        def flag(field: str, default: bool) -> bool:
            v = env.get(SWITCHES[field][0], "").strip()
            return default if not v else v != "0"

        return cls(int8=flag("int8", True), mma=flag("mma", True), pdl=flag("pdl", True),
                   native=flag("native", True), native_step=flag("native_step", True),
                   attn_splits=_splits(env.get("KILN_ATTN_SPLITS", "")), rope_attn=flag("rope_attn", True),
                   pair_gemv=flag("pair_gemv", True), gemv_rope=flag("gemv_rope", True),
                   amx=flag("amx", True), huge_pages=flag("huge_pages", False),
                   triton_cpu=flag("triton_cpu", False))

    def replace(self, **changes) -> Policy:
        return dataclasses.replace(self, **changes)


def _splits(v: str) -> int:
    v = v.strip()
    if not v:
        return 0
    if not v.isdigit() or int(v) < 1:
        raise KilnError(f"KILN_ATTN_SPLITS must be a positive integer (or unset), got {v!r}")
    return int(v)


DEFAULT = Policy.from_env()
