#!/usr/bin/env bash
# One device call: the int8 GEMV's one-warp table (route.q8_table at K <= 2048) and decode attention's late row sums
# (`Launch.late_sum`) — bench/rope_fuse_session.sh with: the GPU tests of both; `kiln bench` old / new alternating at
# depth 0 and 16384 (.ab/old = the commit before both); then (AB_AFTER, still while llama.cpp builds) the split kernel
# alone (bench/read_ceiling.py --no-reads, ALONE lines "shapes|launches") and late sums on / off in
# the model (bench/decode_ab.py --depth 16384, MODEL lines "file|launches JSON"); then `kiln bench --compare
# llama.cpp` on FILES. Prepare here: .ab/old (bench/ab_commits.sh's header); carry .ab and .whl.
# Output under $OUT: gpu_tests.log, ab.jsonl, alone.jsonl, decode_ab_<file>.json, bench.jsonl.
set -u
export AB_TESTS=${AB_TESTS:-"tests/test_quant_kernels.py -k 'pair or int8' tests/test_ops.py::test_rope_decode_attention \
tests/test_ops.py::test_decode_attention"} AB_TESTS_S=${AB_TESTS_S:-150}
export AB_FILES=${AB_FILES:-"qwen3-0.6b"} AB_ROUNDS=${AB_ROUNDS:-1} AB_BUDGET=${AB_BUDGET:-330}
export SIDES=${SIDES:-"old new"}
export ALONE=${ALONE-"qwen3-0.6b|64:8:2:8:1:1:0:0,64:8:3:8:1:1:0:1,64:4:2:4:1:1:0:1,64:4:3:4:1:1:0:1"}  # read_ceiling's --launches
export MODEL=${MODEL-'qwen3-0.6b|[{"warps": 8, "tiles_per_split": 8, "interleave": true, "rope": true, "late_sum": false}, {}]'}
export AB_AFTER='
while IFS="|" read -r shapes launches; do [ -z "$shapes" ] || timeout 90 python bench/read_ceiling.py --no-reads \
  --layers 12 --shapes "$shapes" --launches "$launches" >> "$OUT/alone.jsonl"; done <<< "$ALONE"
while IFS="|" read -r f launches; do [ -z "$f" ] || timeout ${DECODE_AB_S:-90} python bench/decode_ab.py \
  --model /tmp/g/$f-Q4_K_M.gguf --depth 16384 --json "$OUT/decode_ab_$f.json" --launches "$launches" 2>&1 | grep "^tg"
done <<< "$MODEL"'
export FILES=${FILES:-"qwen3-0.6b:Q4_K_M llama-3.2-1b:Q4_K_M qwen3-8b:Q4_K_M"}
exec bash bench/rope_fuse_session.sh
