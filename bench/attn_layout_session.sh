#!/usr/bin/env bash
# One device call: where the split kernel's time goes at depth, and whether keys and values laid side by side help.
# bench/read_ceiling.py --no-reads (one token, each layer its own buffers, one CUDA graph, split + merge) at depths
# 1024 / 4096 / 16384 / 32768 for the 0.6B, 8B and 1B shapes, each with separate key and value tensors (KVCache's
# layout) and with one (1, K, S, 2, D) tensor whose views are the keys and values (a tile's keys and values one run
# of memory). The slope over depth is the streaming rate, the intercept the fixed cost (launch, prologue, tail,
# merge): 2026-12-06-h100-c's attn_fixed put the fixed cost at ~5.5 µs a layer at depth 64 against 28 µs at 16384.
# Then the plain reads of 16384 keys (read_ceiling without --no-reads) for the 0.6B shape, the ceiling beside them.
# Carry .whl. Output under $OUT: alone_<depth>.jsonl, reads.jsonl.
set -u
ROOT=$PWD; mkdir -p $OUT; source bench/carry_env.sh; nvidia-smi --query-gpu=name --format=csv,noheader
for depth in 16384 1024 4096 32768; do
  timeout ${ALONE_S:-60} python bench/read_ceiling.py --no-reads --layers 12 --depth $depth \
    --shapes qwen3-0.6b,qwen3-8b,llama-3.2-1b --kv-layouts separate,interleaved > $OUT/alone_$depth.jsonl 2>&1
  python -c "
import json, sys
for l in open(sys.argv[1]):
    if l.startswith('{'):
        r = json.loads(l); print(r['shape'], r.get('kv'), r['depth'], r.get('us_layer'), r.get('tb_s'), r.get('error', ''))
" $OUT/alone_$depth.jsonl
done
timeout ${READS_S:-90} python bench/read_ceiling.py --layers 12 --shapes qwen3-0.6b > $OUT/reads.jsonl 2>&1
tail -n 4 $OUT/reads.jsonl
