"""`kiln imatrix --model M --data TEXT -o F [--chunks N] [--ctx-size N]`: an importance matrix, as llama-imatrix
makes one.

Owns: collecting, for every linear layer in the model's blocks, the sum over tokens of each input column's
squared activation and the number of tokens (forward pre-hooks; a joined q/k/v or gate/up layer counts for
each of its parts, which all see the same input), over llama-perplexity's chunks of the text (ctx-size
tokens, the first one BOS where the model adds one); writing that in llama.cpp's GGUF imatrix format
(`general.type` "imatrix", `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`, tensors
`<name>.in_sum2` (n_mat, n) and `<name>.counts` (n_mat, 1), F32, names sorted); and reading that format and
the legacy .dat one into {GGUF tensor name: mean squared activation per column}, as llama-quantize's
load_imatrix computes it (sums / round(count); 1 where a count is 0).
Not: quantizing with it (kiln/quantize.py, kiln/quant/quantize.py); MoE expert layers (one matrix per
tensor here); the output head (llama-imatrix skips it too unless --process-output).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import gguf
import numpy as np
import torch

from kiln.errors import KilnError

# Hugging Face module path inside a block -> GGUF tensor kind(s); joined layers (made at load) feed several
_MODULE_KINDS = {
    "self_attn.q_proj": ("attn_q",), "self_attn.k_proj": ("attn_k",), "self_attn.v_proj": ("attn_v",),
    "self_attn.qkv_proj": ("attn_qkv",), "self_attn.o_proj": ("attn_output",),
    "self_attn.qkv": ("attn_q", "attn_k", "attn_v"),
    "mlp.gate_proj": ("ffn_gate",), "mlp.up_proj": ("ffn_up",), "mlp.down_proj": ("ffn_down",),
    "mlp.gate_up_proj": ("ffn_up",),
    # a joined gate/up layer runs through its wide_forward method, which no hook sees: the MLP's own
    # input is the same tensor (gguf_names picks this entry only when the MLP has a joined layer)
    "mlp": ("ffn_gate", "ffn_up"),
}


def gguf_names(module_path: str, module: torch.nn.Module | None = None) -> tuple[str, ...]:
    """The GGUF weight names whose input a module of the model sees (model.layers.3.mlp.down_proj ->
    blk.3.ffn_down.weight), or () for modules outside the blocks' linear layers."""
    m = re.fullmatch(r"(?:.*\.)?layers\.(\d+)\.(.+)", module_path)
    if not m or m.group(2) not in _MODULE_KINDS:
        return ()
    if m.group(2) == "mlp" and getattr(module, "gate_up", None) is None:
        return ()
    return tuple(f"blk.{m.group(1)}.{k}.weight" for k in _MODULE_KINDS[m.group(2)])


class Collector:
    """Sums of squared inputs (float64) and token counts per GGUF weight name, from forward pre-hooks."""

    def __init__(self, model: torch.nn.Module):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._hooks = [mod.register_forward_pre_hook(self._hook(names))
                       for path, mod in model.named_modules() if (names := gguf_names(path, mod))]
        if not self._hooks:
            raise KilnError("the model has no linear layers kiln can name for an importance matrix")

    def _hook(self, names):
        def hook(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).double()
            sq = (x * x).sum(0).cpu()
            for name in names:
                self.sums[name] = self.sums[name] + sq if name in self.sums else sq.clone()
                self.counts[name] = self.counts.get(name, 0) + x.shape[0]
        return hook

    def close(self):
        for h in self._hooks:
            h.remove()


@torch.inference_mode()
def collect(model, chunks: list[list[int]], progress: bool = False) -> Collector:
    """Run each chunk through the model (one sequence each, nothing cached between them) and collect."""
    from kiln.progress import bar
    device = next(model.parameters()).device
    col = Collector(model)
    try:
        for c in bar(chunks, desc="imatrix", unit="chunk", enabled=progress):
            model(torch.tensor([c], device=device), last_only=True)
    finally:
        col.close()
    return col


# ---- files --------------------------------------------------------------------------------------------

def write_imatrix(path, sums: dict, counts: dict, datasets: list[str], chunk_count: int, chunk_size: int):
    """llama.cpp's GGUF imatrix file (what llama-imatrix writes by default), one matrix per tensor."""
    from kiln.formats.gguf import write_file
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    w = gguf.GGUFWriter(str(tmp), arch="")
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)   # llama-imatrix writes no architecture
    w.add_string(gguf.Keys.General.TYPE, "imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", chunk_count)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(sums):
        w.add_tensor(f"{name}.in_sum2", sums[name].to(torch.float32).numpy().reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[counts[name]]], dtype=np.float32))
    write_file(w, tmp, path)
    return path


def _mean(sums: np.ndarray, counts: np.ndarray) -> torch.Tensor:
    """load_imatrix's GGUF branch: per matrix j, sums / (float) lround(count_j), or 1 where the count is 0."""
    c = np.floor(counts.astype(np.float64).reshape(-1) + 0.5).astype(np.float32)   # lround of counts >= 0
    s = sums.astype(np.float32).reshape(c.size, -1)
    out = np.where(c[:, None] > 0, s / np.where(c > 0, c, 1)[:, None], np.float32(1))
    return torch.from_numpy(out.astype(np.float32).reshape(-1))


def _read_gguf_imatrix(path) -> dict[str, torch.Tensor]:
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:
        raise KilnError(f"{path} is not a readable GGUF imatrix file ({e})") from None
    parts: dict[str, dict] = {}
    for t in r.tensors:
        for suffix in (".in_sum2", ".counts"):
            if t.name.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise KilnError(f"{path}: {t.name} is {t.tensor_type.name}, not F32")
                parts.setdefault(t.name[:-len(suffix)], {})[suffix] = np.asarray(t.data)
    if not parts:
        raise KilnError(f"{path} holds no importance matrix entries (no <name>.in_sum2 tensors)")
    out = {}
    for name, p in parts.items():
        if len(p) != 2:
            raise KilnError(f"{path}: mismatched sums and counts for {name}")
        out[name] = _mean(p[".in_sum2"], p[".counts"])
    return out


def _read_legacy_imatrix(path) -> dict[str, torch.Tensor]:
    data = Path(path).read_bytes()
    try:
        (n,), pos, out = struct.unpack_from("<i", data, 0), 4, {}
        if n < 1:
            raise ValueError("no entries")
        for _ in range(n):
            (ln,) = struct.unpack_from("<i", data, pos)
            name = data[pos + 4:pos + 4 + ln].decode()
            ncall, nval = struct.unpack_from("<ii", data, pos + 4 + ln)
            pos += 12 + ln
            if nval < 1 or pos + 4 * nval > len(data):
                raise ValueError(f"entry {name!r} runs past the end")
            v = np.frombuffer(data, np.float32, nval, pos)
            pos += 4 * nval
            out[name] = torch.from_numpy((v / np.float32(ncall)) if ncall > 0 else v.copy())
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise KilnError(f"{path} is neither a GGUF nor a legacy .dat importance matrix ({e})") from None
    return out


def read_imatrix(path) -> dict[str, torch.Tensor]:
    """{GGUF tensor name: importance per input column (float32)} from llama.cpp's GGUF or legacy .dat file."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise KilnError(f"cannot read the importance matrix {path}: {e.strerror}") from None
    return _read_gguf_imatrix(path) if magic == b"GGUF" else _read_legacy_imatrix(path)


# ---- command ------------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    from kiln.commands import _Parser, _load, _model_args, _quantized_arg, check_model_args
    from kiln.eval import check_chunking, read_text
    from kiln.eval import chunks as make_chunks

    p = _Parser(prog="kiln imatrix", description="Compute an importance matrix (mean squared input activation "
                "of every linear layer's columns) over a text, in llama.cpp's GGUF imatrix format, for "
                "`kiln convert --to gguf --imatrix F` or llama-quantize --imatrix F.")
    _model_args(p)
    _quantized_arg(p)
    p.add_argument("--data", "-f", required=True, help="the calibration text (UTF-8)")
    p.add_argument("-o", "--output", required=True, help="the imatrix file to write (GGUF)")
    p.add_argument("--ctx-size", "-c", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="use at most this many chunks (default: all)")
    a = p.parse_args(argv)
    check_chunking(a)
    if not Path(a.output).resolve().parent.is_dir():
        raise KilnError(f"the folder of {a.output} does not exist")
    check_model_args(a)
    text = read_text(a.data, "--data")
    model, tok = _load(a)
    bos = tok.bos_token_id if tok.add_bos else None
    chunks = make_chunks(tok.encode(text), a.ctx_size, a.chunks, bos)
    col = collect(model, chunks, progress=True)
    write_imatrix(a.output, col.sums, col.counts, [a.data], len(chunks), a.ctx_size)
    print(f"{a.output}: {len(col.sums)} entries over {len(chunks)} chunks of {a.ctx_size} tokens")
    return 0
