#!/usr/bin/env bash
# One device call: RoPE fused into the split-KV decode kernel (ops.rope_decode_attention) against the commit
# before it (and this tree with the fusion off, KILN_ROPE_ATTN=0: a third side), and against llama.cpp. While
# llama.cpp builds (bench/gpu_session.sh's PRE_CMD): the GPU tests of the kernels it touches, then `kiln bench`
# old / new / new with the switch alternating at depth 0 and 16384 (bench/ab_commits.sh);
# then `kiln bench --compare llama.cpp` on the new side, each file.
# Prepare here: .ab/old = the old commit (bench/ab_commits.sh's header); carry .ab and .whl.
# Output under $OUT: gpu_tests.log, ab.jsonl, bench.jsonl, session.log lines on stdout.
# AB_AFTER: a command run after the A/B, still while llama.cpp builds (bench/table_check_session.sh's sweep).
set -u
# (the fused kernel's GPU tests alone, and more time: on 2026-12-07 a wider selection was cut at 90-110 s before the
# RoPE tests ran, and these alone at 120 s after 30 of 39)
export AB_TESTS=${AB_TESTS:-"tests/test_ops.py -k 'rope_decode_attention'"}
export AB_FILES=${AB_FILES:-"qwen3-0.6b llama-3.2-1b"}
export SIDES=${SIDES:-"old new new:KILN_ROPE_ATTN=0"}
PRE_CMD='BUDGET=${AB_BUDGET:-300} FILES="$AB_FILES" STEPS="tests bench" ROUNDS=${AB_ROUNDS:-1} TESTS="$AB_TESTS" \
  TESTS_S=${AB_TESTS_S:-150} BENCH_ARGS="-p 512 -g 128 -d 0,16384 -r 3" bash bench/ab_commits.sh; eval "${AB_AFTER:-}"' \
STEPS=compare COLD="" FILES=${FILES:-"llama-3.2-1b:Q4_K_M qwen3-8b:Q4_K_M qwen3-0.6b:Q4_K_M"} \
BENCH_ARGS="-p 512 -d 0,16384 -g 128 -r 3" bash bench/gpu_session.sh
