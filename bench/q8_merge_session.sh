#!/usr/bin/env bash
# One device call (kiln only, no llama.cpp): the attention merge's int8 output for o_proj (ops/attention.MERGE_Q8).
# 1. the attention kernel tests on the GPU; 2. bench/q8_merge_check.py: greedy decode through the Decoder's graphs
# with and without, logits equal bit for bit; 3. tg128 at depth 0 and 16384, MERGE_Q8 True / False alternating,
# Qwen3-0.6B, Llama-3.2-1B, Qwen3-8B Q4_K_M (make_gguf, seed 0). Usage, repo root, .whl/ carried:
#   OUT=... bash bench/q8_merge_session.sh
set -u
ROOT=$PWD
source bench/carry_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
nvidia-smi --query-gpu=name --format=csv,noheader
(for f in qwen3-0.6b llama-3.2-1b qwen3-8b; do
   python bench/make_gguf.py --model $f --type Q4_K_M --out /tmp/g > /dev/null 2>&1; done; echo "files made") &
timeout 110 python -m pytest -q -p no:cacheprovider tests/test_ops.py -k "decode_attention" \
  > "$OUT/gpu_tests_attn_q8.log" 2>&1; echo "tests: $(tail -1 "$OUT/gpu_tests_attn_q8.log")"
wait
for f in qwen3-0.6b llama-3.2-1b; do
  timeout 60 python bench/q8_merge_check.py /tmp/g/$f-Q4_K_M.gguf | tee -a "$OUT/q8_merge_check.jsonl"
done
for r in 1 2; do for f in qwen3-0.6b llama-3.2-1b qwen3-8b; do for on in True False; do
  [ "$r" = 2 ] && [ "$f" = qwen3-8b ] && continue
  timeout 60 python -c "import sys; import kiln.ops.attention as a; a.MERGE_Q8 = $on; from kiln.cli import main; sys.exit(main())" \
    bench --model /tmp/g/$f-Q4_K_M.gguf -p 512 -g 128 -d 0,16384 -r 3 --json > /tmp/b.json 2>/dev/null
  python -c "import json; d=json.load(open('/tmp/b.json')); k=d['kiln']; print(json.dumps({'round': $r, 'file': '$f', 'merge_q8': $on, 'tg': k['decode_tok_s'], 'user': k['decode_user_tok_s']}))" | tee -a "$OUT/q8_merge_ab.jsonl"
done; done; done
