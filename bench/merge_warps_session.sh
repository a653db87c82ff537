#!/usr/bin/env bash
# One device call: the merge kernel with 1 / 2 / 4 warps (attention.MERGE_WARPS): bench/decode_ab.py at depth 16384
# on the 0.6B, the GPU tests at 1 warp, the same on the 1B, then the 0.6B step kernel by kernel (bench/graph_timeline.py).
# Carry .whl. Output under $OUT: merge_warps_<file>.json, gpu_tests_merge1.log, timeline_0.6b.json.
set -u
mkdir -p $OUT /tmp/g; source bench/carry_env.sh; nvidia-smi --query-gpu=name --format=csv,noheader
(timeout 60 python bench/make_gguf.py --model llama-3.2-1b --type Q4_K_M --out /tmp/g > /dev/null 2>&1) &
timeout 60 python bench/make_gguf.py --model qwen3-0.6b --type Q4_K_M --out /tmp/g > /dev/null 2>&1
ab() { timeout ${AB_S:-100} python bench/decode_ab.py --model /tmp/g/$1-Q4_K_M.gguf --depth 16384 \
  --json $OUT/merge_warps_$1.json --launches '[{}, {"merge_warps": 1}, {"merge_warps": 2}]' 2>&1 | grep "^tg"; }
ab qwen3-0.6b
timeout ${TESTS_S:-90} python -c "
import kiln.ops.attention as A, pytest
A.MERGE_WARPS = 1
raise SystemExit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_ops.py::test_decode_attention_stores_its_output_quantized', 'tests/test_ops.py::test_decode_attention_split_counts', 'tests/test_ops.py::test_rope_decode_attention']))
" > $OUT/gpu_tests_merge1.log 2>&1; tail -1 $OUT/gpu_tests_merge1.log
wait; ab llama-3.2-1b
timeout ${TIMELINE_S:-90} python bench/graph_timeline.py /tmp/g/qwen3-0.6b-Q4_K_M.gguf --depth 16384 \
  > $OUT/timeline_0.6b.json 2> $OUT/timeline.err; tail -c 600 $OUT/timeline_0.6b.json
