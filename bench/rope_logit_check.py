"""Teacher-forced decode logits of a GGUF file with a kiln switch on and off (a policy field: gemv_rope, rope_attn,
pair_gemv), on a GPU: over 64 graph-form decode steps, the largest and mean |logit difference|, argmax agreement and
the steps that are bit for bit equal. Usage: python bench/rope_logit_check.py FILE.gguf [FIELD]"""
import json
import sys

import torch

sys.path.insert(0, "tests")
import test_models as tm  # noqa: E402  (decode_steps)

from kiln.load import load  # noqa: E402
from kiln.policy import DEFAULT  # noqa: E402

path, field = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "gemv_rope"
model, tok = load(path, device="cuda")
ids = torch.randint(0, 32000, (1, 80), generator=torch.Generator().manual_seed(0)).cuda()
out = {on: tm.decode_steps(model, ids, 16, max_len=128, graph=True, policy=DEFAULT.replace(**{field: on})).float()
       for on in (True, False)}
a, b = out[True][0, 16:], out[False][0, 16:]
d = (a - b).abs()
print(json.dumps({"file": path, "switch": field, "steps": a.shape[0], "max_abs_dlogit": d.max().item(),
                  "mean_abs_dlogit": d.mean().item(), "logit_scale": b.abs().mean().item(),
                  "argmax_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
                  "bit_equal_steps": int((d.amax(-1) == 0).sum().item())}))
