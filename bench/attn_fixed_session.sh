#!/usr/bin/env bash
# One device call (kiln only): decode attention's fixed cost (bench/attn_fixed.py), then tg128 at depth 0 in a
# short cache (-d 0) and in a 16.6k one (-d 0,16384) on Qwen3-0.6B and Qwen3-8B Q4_K_M (make_gguf, seed 0).
# Output under $OUT: attn_fixed.jsonl, tg_cache.jsonl. Usage, repo root, .whl/ carried:
#   OUT=... bash bench/attn_fixed_session.sh
set -u
ROOT=$PWD
source bench/carry_env.sh
mkdir -p /tmp/g
nvidia-smi --query-gpu=name --format=csv,noheader
(python bench/make_gguf.py --model qwen3-8b --type Q4_K_M --out /tmp/g > /dev/null 2>&1; echo "8b made") &
python bench/make_gguf.py --model qwen3-0.6b --type Q4_K_M --out /tmp/g > /dev/null 2>&1
timeout 150 python bench/attn_fixed.py > $OUT/attn_fixed.jsonl 2> $OUT/attn_fixed.err; echo "attn rc=$?"
wait
for f in qwen3-0.6b qwen3-8b; do
  for d in "0" "0,16384"; do
    timeout 120 python -m kiln.cli bench --model /tmp/g/$f-Q4_K_M.gguf -p 512 -g 128 -d $d -r 3 --json > /tmp/b.json 2>/dev/null
    python -c "import json; d=json.load(open('/tmp/b.json')); k=d['kiln']; print(json.dumps({'file': '$f', 'depths': '$d', 'tg': k['decode_tok_s'], 'kv': k.get('kv_cache')}))" | tee -a $OUT/tg_cache.jsonl
  done
done
