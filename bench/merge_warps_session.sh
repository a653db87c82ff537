#!/usr/bin/env bash
# One device call: the merge kernel with 1 / 2 / 4 warps (attention.MERGE_WARPS): bench/decode_ab.py at depth 16384
# on the 0.6B, the GPU tests at 1 warp, the same on the 1B, then the 0.6B step kernel by kernel
# (bench/graph_timeline.py). As run at f4e5726 it also timed the fused form's new-key weight carried apart
# (attention.FOLD_NEW, removed since: results/2026-12-08-h100).
# Carry .whl. Output under $OUT: merge_warps_<file>.json, gpu_tests_merge1.log, timeline_0.6b.json.
set -u
ROOT=$PWD; mkdir -p $OUT /tmp/g; source bench/carry_env.sh; nvidia-smi --query-gpu=name --format=csv,noheader
(timeout 60 python bench/make_gguf.py --model llama-3.2-1b --type Q4_K_M --out /tmp/g > /dev/null 2>&1) &
timeout 60 python bench/make_gguf.py --model qwen3-0.6b --type Q4_K_M --out /tmp/g > /dev/null 2>&1
ab() { timeout ${AB_S:-150} python bench/decode_ab.py --model /tmp/g/$1-Q4_K_M.gguf --depth 16384 \
  --json $OUT/merge_warps_$1.json --launches "$2" 2>&1 | grep "^tg"; }
ab qwen3-0.6b '[{}, {"merge_warps": 1}, {"merge_warps": 2}]'
timeout ${TESTS_S:-90} python -c "
import kiln.ops.attention as A, pytest
A.MERGE_WARPS = 1
t = 'tests/test_ops.py::test_'
raise SystemExit(pytest.main(['-q', '-p', 'no:cacheprovider', t + 'decode_attention_stores_its_output_quantized',
                              t + 'decode_attention_split_counts', t + 'rope_decode_attention',
                              t + 'rope_decode_attention_never_reads_the_new_slot']))
" > $OUT/gpu_tests_merge1.log 2>&1; tail -1 $OUT/gpu_tests_merge1.log
wait; ab llama-3.2-1b '[{}, {"merge_warps": 1}, {"merge_warps": 2}]'
timeout ${TIMELINE_S:-90} python bench/graph_timeline.py /tmp/g/qwen3-0.6b-Q4_K_M.gguf --depth 16384 \
  > $OUT/timeline_0.6b.json 2> $OUT/timeline.err; tail -c 600 $OUT/timeline_0.6b.json
