#!/usr/bin/env bash
# One short device call: the q8_0 decode kernel with its scales loaded one per block (tests on the GPU,
# bench/kv_direct_check.py parts a-b), then the head-dim-128 split kernel at 16384 keys over split counts
# (bench/attn_sweep.py --focus --splits). Output under $OUT: gpu_tests_q8.log, kv_direct_v2.jsonl,
# attn_sweep_splits.jsonl.
set -u
ROOT=$PWD; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
START=$(date +%s)
. bench/carry_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 80 python -m pytest -q -p no:cacheprovider tests/test_ops.py -k "q8_0" > "$OUT/gpu_tests_q8.log" 2>&1
echo "tests: $(tail -1 "$OUT/gpu_tests_q8.log") at $(( $(date +%s) - START )) s"; grep -E "FAILED|Error" "$OUT/gpu_tests_q8.log" | head -5
timeout 60 python bench/kv_direct_check.py > "$OUT/kv_direct_v2.jsonl" 2>/tmp/kv.err; echo "kv rc=$?"; tail -2 /tmp/kv.err
cut -c 1-300 "$OUT/kv_direct_v2.jsonl"
echo "kv at $(( $(date +%s) - START )) s"
timeout 70 python bench/attn_sweep.py --depths 16384 --focus --splits 0,66,132 --shapes qwen3-8b --budget 55 \
  > "$OUT/attn_sweep_splits.jsonl" 2>/tmp/sw.err; tail -2 /tmp/sw.err; tail -1 "$OUT/attn_sweep_splits.jsonl" | cut -c 1-600
echo "done at $(( $(date +%s) - START )) s"
