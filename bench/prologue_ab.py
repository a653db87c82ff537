"""A/B of the GEMV prologues (kiln.fuse.PROLOGUES) on one file: `kiln bench`'s decode and prefill for
each setting in one process. Usage (GPU machine): python bench/prologue_ab.py FILE.gguf [-g 128]"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kiln.fuse  # noqa: E402
from kiln.bench import bench  # noqa: E402

SETTINGS = {"none": set(), "act": {"silu", "gelu"}, "norm": {"norm"}, "all": {"norm", "silu", "gelu"}}

if __name__ == "__main__":
    path = sys.argv[1]
    for name in sys.argv[2:] or SETTINGS:
        kiln.fuse.PROLOGUES = SETTINGS[name]
        r = bench(path, 512, 128, 3)
        k = r["kiln"]
        print(json.dumps({"file": Path(path).name, "prologues": name, "decode_tok_s": round(k["decode_tok_s"], 1),
                          "prefill_tok_s": round(k["prefill_tok_s"]), "ms_per_token": round(k["ms_per_token"], 3)}),
              flush=True)
