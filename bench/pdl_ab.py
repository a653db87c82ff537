"""A/B of programmatic dependent launch (kiln.ops.pdl; KILN_PDL=0 turns it off) on GGUF files: `kiln.bench`'s
decode and prefill speed with PDL off, then on (each in its own process: the policy is read at import), and
a check that the two compute the same thing (32 greedy decode steps through the CUDA graph: equal tokens,
bit-identical last logits).
Usage (GPU machine): python bench/pdl_ab.py FILE.gguf [FILE.gguf ...] > pdl_ab.jsonl
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def run(path: str, out: str) -> None:
    """One setting (this process's KILN_PDL): bench numbers to stdout, tokens and last logits to `out`."""
    import kiln
    from kiln.bench import run_kiln
    from kiln.decoder import DecoderPool
    model, _ = kiln.load(path, device="cuda")
    r = run_kiln(model, 512, 128, 3)
    dec = DecoderPool(model).get(64)
    tok, toks = torch.tensor([7], device="cuda"), []
    for i in range(32):
        logits = dec.step(tok, i)
        tok = logits.argmax(-1).reshape(1)
        toks.append(int(tok))
    torch.save({"toks": toks, "logits": logits.float().cpu()}, out)
    print(json.dumps({k: r[k] for k in ("decode_tok_s", "prefill_tok_s", "ms_per_token", "capture_s")}))


def setting(path: str, on: bool, tmp: str) -> tuple[dict, list[int], torch.Tensor]:
    out = str(Path(tmp) / f"pdl_{int(on)}.pt")
    p = subprocess.run([sys.executable, __file__, "--one", path, out], env={**os.environ, "KILN_PDL": str(int(on))},
                       capture_output=True, text=True, check=True)
    saved = torch.load(out)
    return json.loads(p.stdout.strip().splitlines()[-1]), saved["toks"], saved["logits"]


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        run(sys.argv[2], sys.argv[3])
        sys.exit(0)
    for path in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            res = {on: setting(path, on, tmp) for on in (False, True)}
        for on, (r, _, _) in res.items():
            print(json.dumps({"file": Path(path).name, "pdl": on, "decode_tok_s": round(r["decode_tok_s"], 1),
                              "prefill_tok_s": round(r["prefill_tok_s"]), "ms_per_token": round(r["ms_per_token"], 4),
                              "capture_s": round(r["capture_s"], 2)}), flush=True)
        same_tokens = res[False][1] == res[True][1]
        same_logits = bool(torch.equal(res[False][2], res[True][2]))
        print(json.dumps({"file": Path(path).name, "same_tokens": same_tokens, "same_logits": same_logits}),
              flush=True)
