#!/usr/bin/env bash
# One device call: the merge kernel with 1 / 2 / 4 warps (attention.MERGE_WARPS): its GPU tests at 1 warp, then
# bench/decode_ab.py at depth 16384 on the 0.6B and 1B, then the 0.6B step kernel by kernel (bench/graph_timeline.py).
# Carry .whl. Output under $OUT: gpu_tests_merge1.log, merge_warps_<file>.json, timeline_0.6b.json.
set -u
mkdir -p $OUT; source bench/carry_env.sh; nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p /tmp/g
(for f in qwen3-0.6b llama-3.2-1b; do timeout 60 python bench/make_gguf.py --model $f --type Q4_K_M --out /tmp/g > /dev/null 2>&1; done; touch /tmp/g/done) &
timeout 100 python -c "
import kiln.ops.attention as A, pytest
A.MERGE_WARPS = 1
raise SystemExit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_ops.py::test_decode_attention_stores_its_output_quantized', 'tests/test_ops.py::test_decode_attention_split_counts', 'tests/test_ops.py::test_rope_decode_attention']))
" > $OUT/gpu_tests_merge1.log 2>&1; tail -1 $OUT/gpu_tests_merge1.log
while [ ! -f /tmp/g/done ]; do sleep 2; done
for f in qwen3-0.6b llama-3.2-1b; do
  timeout 110 python bench/decode_ab.py --model /tmp/g/$f-Q4_K_M.gguf --depth 16384 --json $OUT/merge_warps_$f.json \
    --launches '[{}, {"merge_warps": 1}, {"merge_warps": 2}]' 2>&1 | grep "^tg"
done
timeout 100 python bench/graph_timeline.py /tmp/g/qwen3-0.6b-Q4_K_M.gguf --depth 16384 > $OUT/timeline_0.6b.json 2> $OUT/timeline.err; tail -c 600 $OUT/timeline_0.6b.json
