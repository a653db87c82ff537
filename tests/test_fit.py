"""The fit planner (kiln/fit.py): its decisions for given budgets (table-driven, synthetic sizes) and its byte
counts against a real loaded model."""

import pytest
import torch

from kiln.errors import KilnError
from kiln.fit import GiB, ModelSizes, needs, parse_bytes, plan

MiB = 1 << 20
# 8 blocks of 100 MiB (GPU) / 120 MiB (CPU), 200 MiB embedding and head; 1 KiB of KV elements per position
S = ModelSizes(8, [120 * MiB] * 8, [100 * MiB] * 8, 200 * MiB, 200 * MiB, 210 * MiB, 200 * MiB,
               kv_elems=512, compute_elems=0, max_ctx=4096)


@pytest.mark.parametrize("gpu, host, ctx, kv, want", [
    (10 * GiB, 10 * GiB, 4096, "bf16", 8),      # everything fits: all layers, embedding too
    (0, 10 * GiB, 4096, "bf16", 0),             # no GPU: none
    (450 * MiB, 10 * GiB, 1024, "bf16", 2),     # head 200 + 2 x (100 + 1 MiB KV) = 402; 3 x 101 + 200 = 503
    (450 * MiB, 10 * GiB, 1024, "q4_0", 2),     # quantized KV alone does not make room for a third
    (520 * MiB, 10 * GiB, 1024, "bf16", 3),
    (1000 * MiB, 10 * GiB, 1024, "bf16", 7),    # 7 x 101 + 200 = 907 (8 would add the embedding: 1008)
    (1000 * MiB, 10 * GiB, 16384, "bf16", 6),   # a long context: 7 x (100 + 16 MiB KV) + 200 = 1012
    (1000 * MiB, 10 * GiB, 16384, "q8_0", 7),   # q8_0 KV (8.5 MiB a layer) wins it back: 959.5
])
def test_plan_table(gpu, host, ctx, kv, want):
    p = plan(S, gpu, host, ctx, kv)
    assert p.n_gpu_layers == want
    assert p.gpu_bytes <= gpu and p.host_bytes <= host
    assert p.gpu_bytes == needs(S, want, ctx, kv)[0]


def test_host_budget_counts():
    # 7 on the GPU leaves the embedding + 1 block + its fp32 KV (2 MiB) = 322 MiB on the host
    assert plan(S, 1000 * MiB, 330 * MiB, 1024).n_gpu_layers == 7
    with pytest.raises(KilnError, match="does not fit"):
        plan(S, 1000 * MiB, 300 * MiB, 1024)


def test_nothing_fits_names_smallest_configuration():
    with pytest.raises(KilnError, match=r"smallest configuration that fits: --ctx-size"):
        plan(S, 0, 200 * MiB + 8 * 120 * MiB + 210 * MiB + 8 * 2 * MiB, 8192)  # fits at 1024, not 8192
    with pytest.raises(KilnError, match=r"smallest configuration \(-ngl 0, --ctx-size 256"):
        plan(S, 0, 100 * MiB, 4096)
    with pytest.raises(KilnError, match="cache type"):
        plan(S, GiB, GiB, 1024, "q5_9")


def test_parse_bytes():
    assert parse_bytes("3G") == parse_bytes("3GiB") == 3 * GiB
    assert parse_bytes("512M") == 512 * MiB and parse_bytes("1000") == 1000


def _loaded_bytes(model) -> int:
    """Bytes a loaded model holds: every distinct storage of its parameters and buffers, plus the GGUF rows
    its compact embedding / head read from the memory-mapped file (each mapping once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    for m in model.modules():
        for rows in (getattr(m, "table", None), getattr(m, "exact", None)):
            if rows is not None and rows.raw.data_ptr() not in seen:
                seen.add(rows.raw.data_ptr())
                total += rows.nbytes
    return total


@pytest.mark.model
def test_sizes_match_loaded_model(qwen_path, compact=True):
    import kiln
    from kiln.fit import model_sizes
    s = model_sizes(qwen_path, compact=compact)
    model, _ = kiln.load(qwen_path, device="cpu", quantized=compact)
    predicted = sum(s.layer_cpu) + s.embed_cpu + s.head_cpu
    got = _loaded_bytes(model)
    assert abs(predicted - got) <= 0.001 * got, (predicted, got)  # tolerance 0.1% (rope tables etc.)
