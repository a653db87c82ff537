#!/usr/bin/env bash
# One device call: route.q8_table's rows x warps checked in the whole model. While llama.cpp builds
# (bench/gpu_session.sh's PRE_CMD): the int8 GEMV's GPU tests, `kiln bench` old / new alternating at depth 0 and
# 16384 (bench/ab_commits.sh; .ab/old = the commit before the table change), then the in-graph rows x warps sweep
# at SHAPES (bench/gemv_ncu_session.sh, no ncu; SHAPES="": none); then `kiln bench --compare llama.cpp` on each of FILES.
# Prepare here: .ab/old (bench/ab_commits.sh's header); carry .ab and .whl.
# Output under $OUT: gpu_tests.log, ab.jsonl, sweep/time.jsonl, bench.jsonl.
set -u
export AB_FILES=${AB_FILES:-"llama-3.2-1b"} AB_ROUNDS=${AB_ROUNDS:-2} AB_BUDGET=${AB_BUDGET:-230}
export SHAPES=${SHAPES-"Q4_K:6144:4096 Q4_K:4096:4096 Q4_K:24576:4096 Q4_K:4096:12288 Q6_K:4096:12288 Q6_K:151936:4096"}
export CONFIGS=${CONFIGS:-"1:4,2:4,4:4,8:4,16:4,1:2,2:2,4:2,8:2,4:8"}
PRE_CMD='BUDGET=$AB_BUDGET FILES="$AB_FILES" STEPS="tests bench" ROUNDS=$AB_ROUNDS SIDES="old new" \
  TESTS="tests/test_quant_kernels.py -k '"'"'pair or int8'"'"'" TESTS_S=120 BENCH_ARGS="-p 512 -g 128 -d 0,16384 -r 3" \
  bash bench/ab_commits.sh; [ -z "$SHAPES" ] || OUT=$OUT/sweep NCU="" timeout ${SWEEP_S:-120} bash bench/gemv_ncu_session.sh' \
STEPS=compare COLD="" FILES=${FILES:-"llama-3.2-1b:Q4_K_M qwen3-0.6b:Q4_K_M qwen3-8b:Q4_K_M"} \
BENCH_ARGS="-p 512 -d 0,16384 -g 128 -r 3" bash bench/gpu_session.sh
