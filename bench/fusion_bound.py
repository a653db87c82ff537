"""An upper bound on what fusing a decode step's small kernels away could save (GPU machine only).

    python bench/fusion_bound.py MODEL.gguf --skip norm,act,rope [graph_timeline.py's options] > out.json

The record is graph_timeline.py's, with "skip" (the kernels left out, as given; "none").

Runs bench/graph_timeline.py with the named kernels *not launched* in the decode step: `norm` the residual
RMSNorms that fill an int8 GEMV's input, `act` the gated activation that does, `rope` RoPE with the KV write where
it runs as a kernel of its own (with KILN_ROPE_ATTN=0, or a step ops.rope_decode_attention does not fuse; by
default the split-KV decode kernel does that work and there is no such launch).
The step then computes garbage (stale inputs); its time is what the other kernels take without those, the floor a
fusion that folds their work into neighbouring kernels could reach. Never a way to run a model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description="graph_timeline.py with kernels not launched; its other options pass on")
    ap.add_argument("--skip", default="", help="comma-separated: norm, act, rope (empty: the plain step)")
    a, rest = ap.parse_known_args()
    skip = set(a.skip.split(",")) - {""}
    import kiln.models.base as base
    import kiln.models.llama as llama
    if "norm" in skip:
        norm = base.rms_norm

        def rms_norm(x, w, eps, offset=0.0, residual=None, q8=None, **kw):
            if q8 is not None and residual is not None and x.is_cuda:
                return x, residual
            return norm(x, w, eps, offset, residual, q8=q8, **kw)
        base.rms_norm = rms_norm
    if "act" in skip:
        act = llama.silu_mul
        llama.silu_mul = lambda gu, q8=None, **kw: gu[..., :gu.shape[-1] // 2] if q8 is not None else act(gu, **kw)
    if "rope" in skip:
        import kiln.ops.attention as attention
        attention.rope_qk_write_kv = lambda q, *a, **k: q
    import graph_timeline
    sys.argv = [sys.argv[0]] + rest
    return graph_timeline.main({"skip": a.skip or "none"})

if __name__ == "__main__":
    sys.exit(main())
