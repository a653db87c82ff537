"""The decode step's attention kernels compiled for an H100 (sm_90) on a machine without a GPU: Triton's
ahead-of-time path (front end, lowering to PTX, ptxas), in the forms each KV cache type asks for (the split
kernel, kv_write's encoder) with the warps they launch with, and the default step's RoPE-with-KV-write and merge
kernels; none may spill more than a register or two (`ptxas -v` on the PTX: the encoder's 4-warp form at head dim
128 spilled and took 100 µs a layer on an H100, bench/results/2026-12-06-h100/).

Each form is compiled as the JIT specializes a real launch: pointers 16-byte aligned and integer strides multiples
of 16 (`tt.divisibility`), ints equal to 1 constants (tests/aot_launches.py reads both from the arguments). Without
the hints ptxas sees a form the GPU never runs: the d128 split kernel at 227 registers with no `cp.async` (100 and
pipelined with them), Gemma's d256 float-cache split kernel spilling 5,388 bytes and route's tensor-core tiles up to
668 (none with them), while the encoder's 4-warp d128 form spills either way (1,024 / 17,872 bytes).

Owns: that check. The other kernel tests run Triton's interpreter, which executes the kernels as Python and
so accepts code the GPU compiler rejects (a static branch's early `return` of another type than the
function's last one: the compiler visits what follows it too). Not: whether the compiled kernels compute the
right thing (test_ops in the interpreter; on a GPU the same tests compiled). Each form must also fit the
H100's shared memory (a launch over it fails).

The compile runs in a fresh process without TRITON_INTERPRET (this process may have the interpreter on: a
kernel decorated then is not a compilable JITFunction); about a minute with an empty Triton cache.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

# (name, split kernel: dtypes of q / k cache / v cache / scales, K and V kinds, out rotation, head dim, one split,
#  RoPE in the kernel (ops.rope_decode_attention: 0 no, 1 with q/k norms, 2 with Gemma's offset norms))
SPLIT = [("bf16 d128, split + merge", ("bf16", "bf16", "bf16", "bf16"), 0, 0, False, 128, False, 0),
         ("bf16 d128, one split", ("bf16", "bf16", "bf16", "bf16"), 0, 0, False, 128, True, 0),
         ("q8_0 K+V rotated d128", ("bf16", "i8", "i8", "fp16"), 1, 1, True, 128, False, 0),
         ("q8_0 K / q4_0 V rotated d256", ("bf16", "i8", "u8", "fp16"), 1, 2, True, 256, True, 0),
         ("fp8 d128", ("bf16", "fp8e4nv", "fp8e4nv", "bf16"), 0, 0, False, 128, False, 0),
         ("bf16 d256 (Gemma's global layers)", ("bf16", "bf16", "bf16", "bf16"), 0, 0, False, 256, False, 0),
         ("bf16 d128, RoPE + q/k norms fused, split + merge", ("bf16", "bf16", "bf16", "bf16"), 0, 0, False, 128,
          False, 1),
         ("bf16 d256, RoPE + Gemma's norms fused, one split", ("bf16", "bf16", "bf16", "bf16"), 0, 0, False, 256,
          True, 2)]
# (name, encode kernel: dtypes of q / k codes / k scales / v codes / v scales, K and V kinds, rotations, head dim);
# a side without a rotation passes its keys as the matrix (kv_write._side_args' stand-in), in q's dtype
ENCODE = [("q8_0 K+V rotated, key offset, d128", ("bf16", "i8", "fp16", "i8", "fp16"), 1, 1, True, True, 128),
          ("q8_0 K+V rotated, d64", ("bf16", "i8", "fp16", "i8", "fp16"), 1, 1, True, True, 64),
          ("q8_0 K / q4_0 V rotated d256", ("bf16", "i8", "fp16", "u8", "fp16"), 1, 2, True, True, 256),
          ("fp8 d128", ("bf16", "fp8e4nv", "fp8e4nv", "fp8e4nv", "fp8e4nv"), 3, 3, False, False, 128),
          ("bf16 K / q8_0 V rotated d96", ("bf16", "bf16", "bf16", "i8", "fp16"), 0, 1, False, True, 96),
          ("fp16 model, q4_0 K / q8_0 V unrotated d64", ("fp16", "u8", "fp16", "i8", "fp16"), 2, 1, False, False, 64)]


SMEM = 232448  # bytes of shared memory a program may take on sm_90
SPILL_MAX = 16  # bytes of spill stores a form may have: a register or two (every form compiled here spills none);
#                 the encoder that took 100 µs a call spills 17,872 (this compile) / 1,800 (on the H100)


def _spills(ptx: str) -> int:
    """Bytes of spill stores ptxas reports for the PTX (Triton's own ptxas, sm_90a)."""
    import re
    import tempfile

    import triton
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        r = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(Path(tmp) / "k.ptx"), "-o",
                            str(Path(tmp) / "k.cubin")], capture_output=True, text=True, timeout=300)
    found = re.findall(r"(\d+) bytes spill stores", r.stderr)
    assert r.returncode == 0 and found, r.stderr[-2000:]
    return sum(map(int, found))


def _compile_all() -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kiln.ops import attention, kv_write, rope
    target, out = GPUTarget("cuda", 90, 32), []

    def compile_one(name, fn, pointers, consts, warps=4):
        floats = ("scale", "softcap", "attn_factor", "eps", "offset")
        sig = {n: "constexpr" if n in consts else "*" + pointers[n] if n in pointers else
               "fp32" if n in floats else "i64" if n.startswith("s") else "i32" for n in fn.arg_names}
        # as the JIT specializes a launch: 16-byte aligned pointers, strides (here every "s..." int) multiples of 16
        aligned = [i for i, n in enumerate(fn.arg_names) if n in pointers or (sig[n] == "i64" and n not in floats)]
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                        attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
        try:
            k = triton.compile(src, target=target, options={"num_warps": warps})
            spills = _spills(k.asm["ptx"])
            out.append({"name": name, "spills": spills,
                        "ok": k.metadata.shared <= SMEM and spills <= SPILL_MAX,
                        "error": f"{k.metadata.shared} bytes of shared memory (the H100 has {SMEM}), "
                                 f"{spills} bytes of register spills ({warps} warps)"})
        except Exception as e:  # reported, not raised: every form is tried
            out.append({"name": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[-1500:]}"})

    for name, (q, k, v, s), kk, vk, rot, d, final, fused in SPLIT:
        pointers = dict(q_ptr=q, k_ptr=k, v_ptr=v, pos_ptr="i64", rows_ptr="i64", o_ptr=q if final else "fp32",
                        lse_ptr="fp32", ks_ptr=s, vs_ptr=s, rot_ptr="fp32", kn_ptr=q, vn_ptr=q, qw_ptr=q, kw_ptr=q,
                        inv_ptr="fp32")
        launch = attention.launch_for(d)  # as decode_attention picks it
        consts = dict(T=1, G=4, H=32, D=d, HAS_WINDOW=False, HAS_SOFTCAP=False, HAS_ROWS=True, K_KIND=kk, V_KIND=vk,
                      OUT_ROT=rot, ROPE=fused > 0, HAS_NORM=fused > 0, HAS_OFFSET=fused == 2, FINAL=final, MAX_TILES=8,
                      BLOCK_M=16, BLOCK_N=launch.block_n, BLOCK_D=d, BLOCK_T=2, RUNTIME_LOOP=True,
                      INTERLEAVE=launch.interleave, DOT_PREC=None, PDL=True)
        compile_one("split: " + name, attention._split_kernel, pointers, consts, launch.warps or (8 if d > 128 else 4))
    for name, (q, kc, ks, vc, vs), kk, vk, krot, vrot, d in ENCODE:
        pointers = dict(q_ptr=q, k_ptr=q, v_ptr=q, qo_ptr=q, kc_ptr=kc, ks_ptr=ks, kh_ptr="fp32" if krot else q,
                        vc_ptr=vc, vs_ptr=vs, vh_ptr="fp32" if vrot else q, off_ptr="fp32" if krot else q,
                        pos_ptr="i64", rows_ptr="i64")
        consts = dict(D=d, K_KIND=kk, V_KIND=vk, K_ROT=krot, V_ROT=vrot, HAS_OFFSET=krot, HAS_ROWS=True, ROWS=16,
                      BLOCK_D=triton.next_power_of_2(d), WHOLE=kv_write.whole_rows(d), DOT_PREC=kv_write.ROT_PREC,
                      PDL=True)
        compile_one("encode: " + name, kv_write._encode_kernel, pointers, consts, kv_write.encode_warps(d))
    # the rest of a default (bf16) decode step's attention: RoPE with the q/k norms and the KV write, the merge
    compile_one("rope + KV write, q/k norms, d128", rope._rope_qk_kernel,
                dict(q_ptr="bf16", k_ptr="bf16", v_ptr="bf16", qo_ptr="bf16", ko_ptr="bf16", vo_ptr="bf16",
                     qw_ptr="bf16", kw_ptr="bf16", pos_ptr="i64", rows_ptr="i64", slots_ptr="i64", inv_ptr="fp32"),
                dict(D=128, HALF=64, HAS_NORM=True, HAS_OFFSET=False, HAS_TAIL=False, WRITE_KV=True, HAS_ROWS=True,
                     HAS_SLOTS=True,
                     BLOCK_H=4, BLOCK_HALF=64, BLOCK_TAIL=1, BLOCK_D=128, PDL=True))
    for q8 in (False, True):  # True: the one output row also stored in int8 for the output projection
        compile_one("merge d128" + (", int8 output" if q8 else ""), attention._merge_kernel,
                    dict(o_ptr="fp32", lse_ptr="fp32", out_ptr="bf16", xq_ptr="i32", xd_ptr="fp32", xs_ptr="i32"),
                    dict(D=128, BLOCK_S=64, CHUNKS=1, BLOCK_C=32, Q8=q8, PDL=True))
    return out


def _compile_env(root: Path) -> dict:
    """The compiling child's environment: compiled Triton (no interpreter switches), the checkout first on its path
    and whatever path this process was given after it."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KILN_TRITON_CPU")}
    return dict(env, PYTHONPATH=os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p))


def test_decode_kernels_compile_for_sm90():
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, __file__], cwd=root, env=_compile_env(root), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == len(SPLIT) + len(ENCODE) + 3
    failed = [f"{x['name']}: {x['error']}" for x in results if not x["ok"]]
    assert not failed, "\n\n".join(failed)


if __name__ == "__main__":
    print(json.dumps(_compile_all()))


def test_every_launch_of_a_decode_step_compiles_for_sm90():
    """Every launch QuantLinear makes on an H100 (route's plans for 1-64 rows of each format, bf16 and fp16, and
    the tensor-core forms its table keeps), and every launch of a one-token graph step and a batched-rows step
    of Qwen3-, Gemma-3- and Llama-shaped attention over bf16, q8_0, q4_0 and fp8 caches, compiles for sm_90,
    spilling no more than a register or two; tests/aot_launches.py compiles them in place of running them."""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "tests" / "aot_launches.py")], cwd=root, env=_compile_env(root),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    kernels = {x["kernel"] for x in results}
    assert {"_gemv_kernel", "_gemv_q8_kernel", "_gemv_q8_pair_kernel", "_gemm_q8_kernel", "_mma_kernel", "_dequant_kernel", "_split_kernel",
            "_merge_kernel", "_encode_kernel", "_rope_qk_kernel", "_rms_norm_kernel"} <= kernels
    failed = [f"{x['kernel']} ({x['for']}): {x.get('error') or x['spills']} bytes spilled"
              for x in results if "error" in x or x["spills"] > SPILL_MAX]
    assert not failed, "\n".join(failed)
