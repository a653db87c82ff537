#!/usr/bin/env bash
# One device call: route.q8_table's rows x warps checked in the whole model — bench/rope_fuse_session.sh with the
# int8 GEMV's GPU tests, `kiln bench` old / new alternating at depth 0 and 16384 (.ab/old = the commit before the
# table change), then (AB_AFTER) the in-graph rows x warps sweep at SHAPES (bench/gemv_ncu_session.sh, no ncu;
# SHAPES="": none), all while llama.cpp builds; then `kiln bench --compare llama.cpp` on each of FILES.
# Prepare here: .ab/old (bench/ab_commits.sh's header); carry .ab and .whl.
# Output under $OUT: gpu_tests.log, ab.jsonl, sweep/time.jsonl, bench.jsonl.
set -u
export AB_TESTS=${AB_TESTS:-"tests/test_quant_kernels.py -k 'pair or int8'"} AB_TESTS_S=${AB_TESTS_S:-120}
export AB_FILES=${AB_FILES:-"llama-3.2-1b"} AB_ROUNDS=${AB_ROUNDS:-2} AB_BUDGET=${AB_BUDGET:-230} SIDES=${SIDES:-"old new"}
export SHAPES=${SHAPES-"Q4_K:6144:4096 Q4_K:4096:4096 Q4_K:24576:4096 Q4_K:4096:12288 Q6_K:4096:12288 Q6_K:151936:4096"}
export CONFIGS=${CONFIGS:-"1:4,2:4,4:4,8:4,16:4,1:2,2:2,4:2,8:2,4:8"}
export AB_AFTER='[ -z "$SHAPES" ] || OUT=$OUT/sweep NCU="" timeout ${SWEEP_S:-120} bash bench/gemv_ncu_session.sh'
export FILES=${FILES:-"llama-3.2-1b:Q4_K_M qwen3-0.6b:Q4_K_M qwen3-8b:Q4_K_M"}
exec bash bench/rope_fuse_session.sh
