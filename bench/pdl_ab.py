"""A/B of programmatic dependent launch (kiln.ops.pdl; KILN_PDL=0 turns it off) on GGUF files, one process:
`kiln.bench`'s decode and prefill speed with PDL off, then on, and a check that the two compute the same
thing (32 greedy decode steps through the CUDA graph: equal tokens, bit-identical last logits).
Usage (GPU machine): python bench/pdl_ab.py FILE.gguf [FILE.gguf ...] > pdl_ab.jsonl
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import kiln  # noqa: E402
from kiln.bench import run_kiln  # noqa: E402
from kiln.generate import DecoderPool  # noqa: E402


def run(path: str, on: bool) -> tuple[dict, list[int], torch.Tensor]:
    os.environ["KILN_PDL"] = "1" if on else "0"
    model, _ = kiln.load(path, device="cuda")
    r = run_kiln(model, 512, 128, 3)
    dec = DecoderPool(model).get(64)
    tok, toks = torch.tensor([7], device="cuda"), []
    for i in range(32):
        logits = dec.step(tok, i)
        tok = logits.argmax(-1).reshape(1)
        toks.append(int(tok))
    out = logits.float().cpu()
    del model, dec
    torch.cuda.empty_cache()
    return r, toks, out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        res = {on: run(path, on) for on in (False, True)}
        for on, (r, _, _) in res.items():
            print(json.dumps({"file": Path(path).name, "pdl": on, "decode_tok_s": round(r["decode_tok_s"], 1),
                              "prefill_tok_s": round(r["prefill_tok_s"]), "ms_per_token": round(r["ms_per_token"], 4),
                              "capture_s": round(r["capture_s"], 2)}), flush=True)
        same_tokens = res[False][1] == res[True][1]
        same_logits = bool(torch.equal(res[False][2], res[True][2]))
        print(json.dumps({"file": Path(path).name, "same_tokens": same_tokens, "same_logits": same_logits}),
              flush=True)
