"""kiln.fuse: concatenated projections compute what the separate layers compute."""

import pytest
import torch
from torch import nn

from kiln.fuse import FusedLinear, fuse_projections
from kiln.quant import kernels
from kiln.quant.linear import QuantLinear
from test_quant_kernels import random_rows  # noqa: E402  (random valid GGUF blocks)


def _quant(qtype, n, k, seed):
    raw = random_rows(qtype, n, k, seed=seed)
    return QuantLinear(k, n, qtype, packed=kernels.repack(raw, qtype, (n, k)))


def test_quant_groups_join_by_type():
    """Q4_K q and k join into one packed matrix; a Q6_K v stays apart (a Q4_K_M file's mix)."""
    q, k, v = _quant(kernels.Q4_K, 64, 256, 0), _quant(kernels.Q4_K, 32, 256, 1), _quant(kernels.Q6_K, 32, 256, 2)
    f = FusedLinear([q, k, v])
    assert [g.out_features for g in f.groups] == [96, 32] and f.wide is None
    x = torch.randn(3, 256)
    for got, lin in zip(f(x), (q, k, v)):
        assert torch.equal(got, lin(x))
    assert torch.equal(f.groups[0].dequantize(), torch.cat([q.dequantize(), k.dequantize()]))


def test_dense_join_and_model_unchanged():
    import test_models as tm
    cfg = tm.CONFIGS["qwen3"]
    hf, _ = tm._hf_model(cfg)
    km = tm._kiln_model(cfg, hf)
    ids = torch.randint(0, cfg["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = km(ids)
        fuse_projections(km)
        got = km(ids)
    attn = km.model.layers[0].self_attn
    assert attn.qkv is not None and attn.qkv.wide is not None and not hasattr(attn, "q_proj")
    assert km.model.layers[0].mlp.gate_up.wide is not None
    assert (got - ref).abs().max().item() <= 1e-5


def test_mixed_storage_never_joins():
    a = nn.Linear(8, 4)
    b = nn.Linear(8, 4).to(torch.float64)
    assert len(FusedLinear([a, b]).groups) == 2
