"""SDPA with a boolean mask on the GPU: time of a call at shapes not seen before against a repeated shape, per
backend (a one-token query over S keys, bf16): does a new key count cost a plan build?"""
import time, torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
dev = "cuda"
print(torch.__version__, torch.cuda.get_device_name())
def run(S, backends=None):
    q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16, device=dev)
    k = torch.randn(1, 32, S, 128, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    m = torch.ones(1, S, dtype=torch.bool, device=dev)
    torch.cuda.synchronize(); t = time.perf_counter()
    if backends is None:
        F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    else:
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    torch.cuda.synchronize(); return 1e3 * (time.perf_counter() - t)
run(50)
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
for name, b in [("default", None), ("no cudnn", NO_CUDNN), ("efficient", [SDPBackend.EFFICIENT_ATTENTION]),
                ("math", [SDPBackend.MATH]), ("cudnn", [SDPBackend.CUDNN_ATTENTION])]:
    try:
        new = [run(S, b) for S in range(100, 110)]
        same = [run(100, b) for _ in range(5)]
        print(f"{name:10s} new shapes ms {[round(x, 2) for x in new]} "
              f"same shape {[round(x, 3) for x in same]}")
    except Exception as e:
        print(name, "error", repr(e)[:200])
import sys
sys.path.insert(0, ".")
from kiln.models.base import attend  # noqa: E402
def run_kiln(S):
    q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16, device=dev)
    k = torch.randn(1, 8, S, 128, dtype=torch.bfloat16, device=dev)
    m = torch.ones(1, S, dtype=torch.bool, device=dev)
    torch.cuda.synchronize(); t = time.perf_counter()
    attend(q, k, k, m, 0.1)
    torch.cuda.synchronize(); return 1e3 * (time.perf_counter() - t)
print("kiln attend, new shapes ms", [round(run_kiln(S), 2) for S in range(200, 210)])
