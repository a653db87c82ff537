"""llama.cpp's side of kiln's quantization tests, run as a child process (llama_cpp must be imported before
numpy and torch: the AVX-512 wheel built for this project crashes otherwise). Prints one JSON line.

Owns: calling llama-cpp-python 0.3.36 and the ggml library it loads, never kiln:
  quantize SRC OUT FTYPE            llama_model_quantize (llama-quantize without an importance matrix)
  run FILE                          load FILE in llama.cpp, evaluate IDS, print the last position's logits
  check SRC OUT_DIR FILE:FTYPE ...  for each FILE: quantize SRC to OUT_DIR/llama-<FILE's name> in FTYPE, and
                                    run FILE (both of the above, in one process)
  imatrix IMATRIX SRC KILN_FILE     read IMATRIX with ggml's own GGUF reader (gguf_init_from_file) and, as
                                    llama-quantize's load_imatrix does, take in_sum2 / lround(counts); then
                                    quantize each of SRC's F32 weights with ggml_quantize_chunk and that row
                                    in the type KILN_FILE holds it in, and say which tensors' bytes equal
                                    KILN_FILE's.
llama_model_quantize cannot take an importance matrix from Python: its `imatrix` parameter is a C++
std::unordered_map, so the imatrix path goes through ggml_quantize_chunk, the function llama-quantize calls.
"""

import llama_cpp  # noqa: I001

import ctypes
import json
import sys

IDS = [1, 5, 9, 33, 2, 70, 11, 3]


def quantize(src: str, out: str, ftype: str) -> dict:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = int(ftype), 1
    return {"rc": int(llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(p)))}


def run(path: str) -> dict:
    m = llama_cpp.Llama(path, n_ctx=64, n_batch=64, verbose=False, logits_all=True)
    m.eval(IDS)
    return {"logits": [float(v) for v in m.scores[len(IDS) - 1]]}


def check(src: str, out_dir: str, *items: str) -> dict:
    import os
    result = {}
    for item in items:
        path, ftype = item.rsplit(":", 1)
        out = os.path.join(out_dir, "llama-" + os.path.basename(path))
        result[os.path.basename(path)] = {**quantize(src, out, ftype), **run(path), "llama_file": out}
    return result


class _Params(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _ggml_gguf(path: str) -> dict:
    """{tensor name: (type, bytes)} and the imatrix keys, as ggml's GGUF reader parses the file."""
    lib = llama_cpp.llama_cpp._lib
    for name, res, args in [
            ("gguf_init_from_file", ctypes.c_void_p, [ctypes.c_char_p, _Params]),
            ("gguf_get_n_tensors", ctypes.c_int64, [ctypes.c_void_p]),
            ("gguf_get_tensor_name", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
            ("gguf_get_tensor_type", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
            ("gguf_get_tensor_offset", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
            ("gguf_get_tensor_size", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
            ("gguf_get_data_offset", ctypes.c_size_t, [ctypes.c_void_p]),
            ("gguf_find_key", ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
            ("gguf_get_val_str", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
            ("gguf_get_val_u32", ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_int64]),
            ("gguf_get_arr_n", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
            ("gguf_get_arr_str", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t]),
            ("gguf_free", None, [ctypes.c_void_p])]:
        getattr(lib, name).restype, getattr(lib, name).argtypes = res, args
    ctx = lib.gguf_init_from_file(path.encode(), _Params(True, None))
    if not ctx:
        raise SystemExit(json.dumps({"error": f"ggml cannot read {path}"}))
    key = lambda k: lib.gguf_find_key(ctx, k.encode())  # noqa: E731
    meta = {"general.type": lib.gguf_get_val_str(ctx, key("general.type")).decode(),
            "datasets": [lib.gguf_get_arr_str(ctx, key("imatrix.datasets"), i).decode()
                         for i in range(lib.gguf_get_arr_n(ctx, key("imatrix.datasets")))],
            "chunk_count": lib.gguf_get_val_u32(ctx, key("imatrix.chunk_count")),
            "chunk_size": lib.gguf_get_val_u32(ctx, key("imatrix.chunk_size"))}
    base = lib.gguf_get_data_offset(ctx)
    with open(path, "rb") as f:
        raw = f.read()
    tensors = {}
    for i in range(lib.gguf_get_n_tensors(ctx)):
        off = base + lib.gguf_get_tensor_offset(ctx, i)
        tensors[lib.gguf_get_tensor_name(ctx, i).decode()] = (
            lib.gguf_get_tensor_type(ctx, i), raw[off:off + lib.gguf_get_tensor_size(ctx, i)])
    lib.gguf_free(ctx)
    return {"meta": meta, "tensors": tensors}


def imatrix(imatrix_path: str, src: str, kiln_file: str) -> dict:
    import gguf
    import numpy as np
    g = _ggml_gguf(imatrix_path)
    values = {}
    for name, (_, data) in g["tensors"].items():
        if name.endswith(".in_sum2"):
            base = name[:-len(".in_sum2")]
            sums = np.frombuffer(data, np.float32)
            count = float(np.frombuffer(g["tensors"][base + ".counts"][1], np.float32)[0])
            c = np.float32(int(count + 0.5))
            values[base] = (sums / c).astype(np.float32) if c > 0 else np.ones_like(sums)
    fn = llama_cpp.llama_cpp._lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]
    source = {t.name: t for t in gguf.GGUFReader(src).tensors}
    same, used = {}, 0
    for t in gguf.GGUFReader(kiln_file).tensors:
        x = np.ascontiguousarray(np.asarray(source[t.name].data, np.float32))
        if x.ndim < 2 or t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            continue
        rows, n = x.reshape(-1, x.shape[-1]).shape
        block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        out = np.zeros(rows * (n // block) * size, np.uint8)
        w = values.get(t.name)
        used += w is not None
        fn(int(t.tensor_type), x.ctypes.data, out.ctypes.data, 0, rows, n, None if w is None else w.ctypes.data)
        same[t.name] = bool(np.array_equal(out, np.asarray(t.data).reshape(-1).view(np.uint8)))
    return {"meta": g["meta"], "entries": sorted(values), "same": same, "used": used}


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    print(json.dumps({"quantize": quantize, "run": run, "check": check, "imatrix": imatrix}[cmd](*args)))
