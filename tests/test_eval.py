"""kiln perplexity (kiln/eval.py) against llama.cpp's, computed the way llama-perplexity computes it.

The reference (tests/data/ppl_refs.json, made by tests/data/make_ppl_refs.py with llama-cpp-python) is
llama.cpp's PPL of the real Qwen2.5-Coder-0.5B on tests/data/ppl_text.txt in 16 chunks of 128 tokens. kiln's
must agree within 0.5% (llama.cpp rounds activations to 8 bits inside its dot products; kiln does not) and
score the same tokens. The KL statistics are checked against torch's own KL divergence.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln.errors import KilnError
from kiln.eval import chunks, kl_stats, perplexity

DATA = Path(__file__).parent / "data"


@pytest.mark.model
def test_perplexity_matches_llama_cpp(qwen):
    model, tok = qwen
    ref = json.loads((DATA / "ppl_refs.json").read_text())
    text = (DATA / "ppl_text.txt").read_text(encoding="utf-8")
    assert tok.encode(text) == ref["tokens"]  # the same tokens, so the same chunks
    r = perplexity(model, tok, text, ref["n_ctx"], ref["chunks"])
    assert r.count == ref["count"] and r.chunks == ref["chunks"]
    assert abs(r.ppl / ref["ppl"] - 1) < 0.005, (r.ppl, ref["ppl"])
    assert abs(r.error / ref["ppl_error"] - 1) < 0.05


def test_kl_statistics_equal_torch_kl_div():
    torch.manual_seed(0)
    n_ctx, v = 8, 11
    ids = [torch.randint(0, v, (n_ctx,)).tolist() for _ in range(3)]
    base = [torch.randn(n_ctx - 1 - n_ctx // 2, v).log_softmax(-1) for _ in ids]
    new = [b + 0.3 * torch.randn_like(b) for b in base]
    new = [x.log_softmax(-1) for x in new]
    got = kl_stats({"tokens": ids, "logprobs": [b.half() for b in base]}, list(zip(ids, new)))
    b16 = torch.cat([b.half().float() for b in base])
    want = torch.nn.functional.kl_div(torch.cat(new), b16, log_target=True, reduction="none").sum(-1)
    assert got["mean_kl"] == pytest.approx(float(want.mean()), rel=1e-6)
    assert got["max_kl"] == pytest.approx(float(want.max()), rel=1e-6)
    assert got["same_top1"] == pytest.approx(float((b16.argmax(-1) == torch.cat(new).argmax(-1)).float().mean()))
    assert got["positions"] == 3 * (n_ctx - 1 - n_ctx // 2)
    with pytest.raises(KilnError, match="other tokens"):
        kl_stats({"tokens": [[0] * n_ctx] * 3, "logprobs": base}, list(zip(ids, new)))


def test_chunking_rule_and_errors():
    assert chunks(list(range(10)), 4, None, bos=None) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert chunks(list(range(10)), 4, 1, bos=99) == [[99, 1, 2, 3]]
    with pytest.raises(KilnError, match="at least 2"):
        chunks(list(range(7)), 4, None, None)
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "perplexity", "--file", "/no/such/file.txt"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "cannot read --file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
