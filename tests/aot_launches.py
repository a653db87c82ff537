"""Every Triton launch a quantized matmul and a decode step make, compiled for an H100 (sm_90) instead of run:
test_kernels_aot.py runs this file in a fresh process without the interpreter (KILN_TRITON_CPU=1 routes CPU
tensors to the kernels).

`JITFunction.run` is replaced by a compile: each launch's arguments as the entry point passed them give the
signature (tensors as pointers of their dtype, ints, floats) and the constexprs, its options the warps, stages
and PDL; Triton's AOT path lowers it and ptxas (-v) reports its spills. The entry points then go on with
unwritten outputs, which nothing reads. Prints one JSON list: per distinct compiled form, its kernel, the
matmul it served, the shared memory and the bytes of spill stores.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ["KILN_TRITON_CPU"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from test_kernels_aot import _spills  # noqa: E402

DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8", torch.uint8: "u8",
          torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.float8_e4m3fn: "fp8e4nv"}
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl")
RESULTS: dict = {}
CONTEXT = [""]


def _compile(fn: JITFunction, args, kwargs):
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    sig, consts, aligned = {}, {}, []
    for i, p in enumerate(fn.params):
        v = bound.get(p.name, p.default)
        if p.is_constexpr:
            consts[p.name] = v
            sig[p.name] = "constexpr"
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + DTYPES[v.dtype]
            if v.data_ptr() % 16 == 0:  # as the JIT specializes a launch's arguments (Triton's "D" key)
                aligned.append(i)
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int) and v == 1 and not p.do_not_specialize:
            consts[p.name] = 1  # the JIT compiles an int argument of 1 as the constant
            sig[p.name] = "constexpr"
        elif isinstance(v, int):
            sig[p.name] = "i64" if not -2**31 <= v < 2**31 else "i32"
            if v % 16 == 0 and not p.do_not_specialize:
                aligned.append(i)
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} is {type(v).__name__}")
    options = {k: v for k, v in kwargs.items() if k in OPTIONS}
    key = (fn.__name__, json.dumps(sig, sort_keys=True), repr(sorted(consts.items())), repr(sorted(options.items())),
           repr(aligned))
    if key in RESULTS:
        return
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        RESULTS[key] = {"kernel": fn.__name__, "for": CONTEXT[0], "shared": k.metadata.shared,
                        "spills": _spills(k.asm["ptx"]), "warps": options.get("num_warps", 4), "consts": consts}
    except Exception as e:  # noqa: BLE001  (reported: every form is tried)
        RESULTS[key] = {"kernel": fn.__name__, "for": CONTEXT[0], "error": f"{type(e).__name__}: {str(e)[-1200:]}"}


def run(self, *args, grid, warmup, **kwargs):
    _compile(self, args, kwargs)


def model_steps() -> None:
    """A decode step in its CUDA-graph form and a server's batched-rows step, for model shapes of each attention
    form (Qwen3: head dim 128, q/k norms; Gemma 3: 256, a sliding and a global layer; Llama: 64) in bf16
    over a bf16 cache and over q8_0 / q4_0 / fp8 ones: the norm, RoPE-with-KV-write, encoder, split / merge
    and gated-activation launches each makes."""
    from kiln.cache import KVCache, Step
    from kiln.load import build_model
    from test_bounded_cache import _weights
    base = dict(vocab_size=256, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False)
    shapes = {"qwen3": dict(base, model_type="qwen3", num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                            rope_theta=1e6),
              "gemma3": dict(base, model_type="gemma3", num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                             rope_theta=1e6, rope_local_base_freq=1e4, sliding_window=512, query_pre_attn_scalar=256,
                             layer_types=["sliding_attention", "full_attention"]),
              "llama": dict(base, model_type="llama", num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                            rope_theta=5e5)}
    for name, cfg in shapes.items():
        model = build_model(cfg, _weights(cfg), dtype=torch.bfloat16)
        for kind in (None, "q8_0", "q4_0", "fp8"):
            CONTEXT[0] = f"{name} decode step, {kind or 'bf16'} cache"
            cache = KVCache.for_model(model, batch=2, max_len=2048, type_k=kind, type_v=kind)
            with torch.no_grad():
                model(torch.zeros(1, 1, dtype=torch.long), Step.graph(cache.slot(0), torch.tensor(1000)))
                CONTEXT[0] = f"{name} batched rows, {kind or 'bf16'} cache"
                model(torch.zeros(2, 1, dtype=torch.long), Step.rows(cache.rows([0, 1], 2048), torch.tensor([900, 5])))


def main() -> None:
    from kiln.quant import packed as K
    from kiln.quant import route
    from kiln.quant.linear import QuantLinear
    from kiln.quant.mma import gemm_mma
    JITFunction.run = run
    route.sm_count = lambda device: 132  # the H100's: the plans (splits, tables) an H100 gets
    for qtype in K.FORMATS:
        n, k = 1024, 2048
        fmt = K.FORMATS[qtype]
        raw = torch.zeros(n, k // fmt.block * fmt.type_size, dtype=torch.uint8)  # never read: only compiled for
        layer = QuantLinear.from_gguf(raw, qtype, (n, k), device="cpu")
        for dtype in (torch.bfloat16, torch.float16):
            for m in (1, 4, 16, 32, 64):
                CONTEXT[0] = f"{fmt.name} {m} rows {DTYPES[dtype]}"
                with torch.no_grad():
                    layer(torch.zeros(m, k, dtype=dtype))
            # the tensor-core tiles route's table keeps for wider matrices (an output head, a 1B's gate/up): the
            # same compiled forms over this layer (the weight's rows are a run-time argument)
            for rows, wide in ((16, 65536), (32, 65536), (16, 16384)):
                cfg = route.mma_config(qtype, wide, k, rows, dtype)
                if cfg is not None:
                    CONTEXT[0] = f"{fmt.name} {rows} rows {DTYPES[dtype]}, tensor cores as for {wide}x{k}"
                    gemm_mma(torch.zeros(rows, k, dtype=dtype), layer.packed, None,
                             route.mma_launch(cfg, qtype, wide, k, 132))
    # route.q8_table's forms at K <= 2048: 8 rows of 2 warps from 6144 rows (a 1B's gate/up, a small model's
    # output head), one warp below (4 rows at K 1024, 2 at K 2048)
    for qtype, (n, k) in itertools.product((K.Q4_K, K.Q6_K), ((8192, 2048), (3072, 1024), (2048, 2048))):
        fmt = K.FORMATS[qtype]
        wide = QuantLinear.from_gguf(torch.zeros(n, k // fmt.block * fmt.type_size, dtype=torch.uint8), qtype,
                                     (n, k), device="cpu")
        CONTEXT[0] = f"{fmt.name} 1 row bf16 of {n}x{k}: {'%d rows, %d warps' % route.q8_table(qtype, n, k)}"
        with torch.no_grad():
            wide(torch.zeros(1, k, dtype=torch.bfloat16))
    # one launch for a joined q/k/v of two formats (QuantLinear.paired): Llama-3.2-1B's and Qwen3-8B's shapes
    from kiln.ops.rope import RopeOut
    from kiln.quant.gemv_int8 import empty_act
    for (qa, qb), (na, nb, k) in [((K.Q4_K, K.Q6_K), (2560, 512, 2048)), ((K.Q4_K, K.Q6_K), (5120, 1024, 4096)),
                                  ((K.Q4_K, K.Q5_K), (2560, 512, 2048)), ((K.Q5_0, K.Q8_0), (1152, 128, 896))]:
        a, b = (QuantLinear.from_gguf(torch.zeros(n, k // K.FORMATS[q].block * K.FORMATS[q].type_size,
                                                  dtype=torch.uint8), q, (n, k), device="cpu")
                for q, n in ((qa, na), (qb, nb)))
        CONTEXT[0] = f"{K.FORMATS[qa].name} {na}x{k} + {K.FORMATS[qb].name} {nb}x{k} in one launch"
        x = torch.zeros(1, k, dtype=torch.bfloat16)
        assert a.paired(b, x, empty_act(k, x.dtype, x.device)) is not None
        if k == 2048:  # the same with RoPE and the KV write in the epilogue (Llama-3.2-1B: head dim 64, 8 kv heads)
            CONTEXT[0] += ", RoPE epilogue"
            kc = torch.zeros(1, 8, 4096, 64, dtype=x.dtype)
            rope = RopeOut(torch.zeros(1, dtype=torch.long), torch.ones(32), 1.0, kc, torch.zeros_like(kc), 2048)
            for parts in ([a, b], [a]):
                assert QuantLinear.rope_joined(parts, x, empty_act(k, x.dtype, x.device), rope) is not None
    model_steps()
    print(json.dumps(list(RESULTS.values())))


if __name__ == "__main__":
    main()
