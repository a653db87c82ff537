"""Nsight Compute view of mma.gemm_mma at Llama-3.2-1B's widest shapes (32 rows of x): a few calls per
config for `ncu` to profile. Usage (GPU machine): ncu --set full -k regex:_mma_kernel python bench/mma_ncu.py"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_quant_check as G  # noqa: E402

import torch  # noqa: E402

from kiln.quant import packed as K  # noqa: E402
from kiln.quant import route as R  # noqa: E402
from kiln.quant.mma import gemm_mma  # noqa: E402

for qtype, n, k, cfg in [(K.Q4_K, 16384, 2048, R.MmaConfig(block_n=128, words=32)),
                         (K.Q4_K, 16384, 2048, R.MmaConfig(block_n=32, words=32, natural=True)),
                         (K.Q6_K, 128256, 2048, R.MmaConfig(block_n=32, words=32, natural=True))]:
    w = K.repack(G.random_rows(qtype, n, k, 0), qtype, (n, k))
    x = torch.randn(32, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        gemm_mma(x, w, None, R.mma_launch(cfg, qtype, n, k, R.sm_count(x.device)))
    torch.cuda.synchronize()
