"""The compact CPU weights' pages, one mode a process, on the real Qwen2.5-Coder-1.5B Q4_K_M (two threads).

    python bench/huge_pages_ab.py plain|arena|collapse|bg

plain: 4 KiB pages (the default); arena: KILN_HUGE_PAGES=1 (quant/cpu._to_huge_pages: an anonymous mapping advised
for huge pages, the buffers copied in); collapse: madvise(MADV_COLLAPSE) over each buffer's whole 2 MiB pages in
place (Linux 6.1+), at load; bg: the same collapse in a background thread while decoding starts. Prints one JSON
line: load seconds, AnonHugePages, and four rounds of 64 greedy decode tokens' tok/s.
"""
import ctypes, os, sys, time, json, statistics
mode = sys.argv[1]
if mode != "plain":
    os.environ["KILN_HUGE_PAGES"] = "1"
import torch
torch.set_num_threads(2)
import kiln
import kiln.quant.cpu as C

def collapse(model):
    libc = ctypes.CDLL(None, use_errno=True)
    kinds = (C.BlockLinear, C.Int4Linear, C.Int8Linear)
    seen, n, t0 = set(), 0, time.perf_counter()
    for m in model.modules():
        if not isinstance(m, kinds):
            continue
        for k, t in m._buffers.items():
            if t is None or t.nbytes < C.HUGE_PAGE or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            lo = -(-t.data_ptr() // C.HUGE_PAGE) * C.HUGE_PAGE
            hi = (t.data_ptr() + t.nbytes) // C.HUGE_PAGE * C.HUGE_PAGE
            if hi > lo:
                r = libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(25))
                n += r == 0
    print("collapsed", n, f"{time.perf_counter() - t0:.3f}s", file=sys.stderr)
if mode == "collapse":
    C._to_huge_pages = collapse
if mode == "bg":
    import threading
    C._to_huge_pages = lambda model: threading.Thread(target=collapse, args=(model,), daemon=True).start()
path = os.path.expanduser("~/.cache/kiln/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
t = time.perf_counter()
model, tok = kiln.load(path)
load = time.perf_counter() - t
hp = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")][0].split()[1]
from kiln.decoder import Decoder
dec = Decoder.for_model(model, 256)
ids = torch.tensor([list(range(100, 116))])
dec.prefill(ids, 0)
tokn = torch.tensor([5])
for i in range(4):
    dec.step(tokn, 16 + i)
rates = []
for r in range(4):
    t = time.perf_counter()
    for i in range(64):
        tokn = dec.step(tokn, 20 + i).argmax(-1)
    rates.append(64 / (time.perf_counter() - t))
print(json.dumps({"mode": mode, "load_s": round(load, 3), "anon_huge_kb": int(hp), "tok_s": [round(x, 2) for x in rates]}))
