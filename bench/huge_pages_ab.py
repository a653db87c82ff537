"""The compact CPU weights' pages, one mode a process, on the real Qwen2.5-Coder-1.5B Q4_K_M (two threads).

    python bench/huge_pages_ab.py plain|arena|collapse|bg

plain: 4 KiB pages (the default); arena: KILN_HUGE_PAGES=1 (quant/cpu._to_huge_pages: an anonymous mapping advised
for huge pages, the buffers copied in); collapse: madvise(MADV_COLLAPSE) over each buffer's whole 2 MiB pages in
place (Linux 6.1+), at load; bg: the same collapse in a background thread while decoding starts. Prints one JSON
line: load seconds, AnonHugePages, and four rounds of 64 greedy decode tokens' tok/s.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time
from pathlib import Path

MADV_COLLAPSE = 25  # linux/mman.h (6.1+); Python's mmap module does not name it
MODEL = Path.home() / ".cache/kiln/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"


def collapse(model) -> None:
    """madvise(MADV_COLLAPSE) over the whole 2 MiB pages inside each compact layer's large buffers."""
    import kiln.quant.cpu as C
    libc = ctypes.CDLL(None, use_errno=True)
    seen, done, t0 = set(), 0, time.perf_counter()
    for m in model.modules():
        if not isinstance(m, (C.BlockLinear, C.Int4Linear, C.Int8Linear)):
            continue
        for t in m._buffers.values():
            if t is None or t.nbytes < C.HUGE_PAGE or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            lo = -(-t.data_ptr() // C.HUGE_PAGE) * C.HUGE_PAGE
            hi = (t.data_ptr() + t.nbytes) // C.HUGE_PAGE * C.HUGE_PAGE
            if hi > lo:
                done += libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(MADV_COLLAPSE)) == 0
    print(f"collapsed {done} buffers in {time.perf_counter() - t0:.3f} s", file=sys.stderr)


def main() -> None:
    mode = sys.argv[1]
    if mode != "plain":
        os.environ["KILN_HUGE_PAGES"] = "1"  # the arena, or the hook the other modes replace
    import torch
    torch.set_num_threads(2)
    import kiln
    import kiln.quant.cpu as C
    from kiln.decoder import Decoder
    if mode == "collapse":
        C._to_huge_pages = collapse
    elif mode == "bg":
        C._to_huge_pages = lambda model: threading.Thread(target=collapse, args=(model,), daemon=True).start()
    t = time.perf_counter()
    model, _ = kiln.load(str(MODEL))
    load = time.perf_counter() - t
    huge = next(line for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")).split()[1]
    dec = Decoder.for_model(model, 256)
    dec.prefill(torch.tensor([list(range(100, 116))]), 0)
    tok = torch.tensor([5])
    for i in range(4):
        dec.step(tok, 16 + i)
    rates = []
    for _ in range(4):
        t = time.perf_counter()
        for i in range(64):
            tok = dec.step(tok, 20 + i).argmax(-1)
        rates.append(round(64 / (time.perf_counter() - t), 2))
    print(json.dumps({"mode": mode, "load_s": round(load, 3), "anon_huge_kb": int(huge), "tok_s": rates}))


if __name__ == "__main__":
    main()
