"""The compact CPU path (int8 rows, bf16 activations) against the dense fp32 model it replaces."""

import torch

from kiln.quant.cpu import Int8Linear, int8_linears


def test_int8_linear_is_close_to_the_dense_layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=True)
    q = Int8Linear(lin.weight, lin.bias)
    assert q.nbytes == 96 * 256 + 2 * 96  # a quarter of fp32
    for m in (1, 5, 40):
        x = torch.randn(2, m, 256)
        ref = lin(x)
        err = ((q(x) - ref).norm() / ref.norm()).item()
        assert err < 0.02, (m, err)  # int8 rows + bf16 activations: ~0.5% typical
    w = q.dequantize()
    assert ((w - lin.weight).abs() <= q.scale.float()[:, None] * 0.51 + 1e-6).all()  # half a step, per row


def test_int8_model_keeps_its_predictions():
    import test_models as tm
    cfg = tm.CONFIGS["qwen2"]
    hf, _ = tm._hf_model(cfg)
    dense = tm._kiln_model(cfg, hf)
    packed = int8_linears(tm._kiln_model(cfg, hf))
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    ids = torch.randint(0, cfg["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = dense(ids), packed(ids)
    assert ((a - b).norm() / a.norm()).item() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
