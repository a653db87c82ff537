import time, torch, kiln, sys, statistics
from kiln.ops import cpu as C
torch.set_num_threads(2)
model, tok = kiln.load(sys.argv[1], device="cpu")
from kiln.cache import KVCache
from kiln.decoder import prefill_chunk
res = {}
for T in (128, 512):
    ids = torch.randint(100, 10000, (1, T))
    for rnd in range(4):
        for pack in (1024, 2048):
            C.TILE_PACK = pack
            cache = KVCache.for_model(model, max_len=T + 8)
            t = time.perf_counter()
            with torch.inference_mode():
                prefill_chunk(model, ids, cache, 0)
            res.setdefault((T, pack), []).append(time.perf_counter() - t)
for k, v in sorted(res.items()):
    print(k, "median", round(statistics.median(v) * 1e3), "ms", [round(x * 1e3) for x in v])
