#!/usr/bin/env bash
# One device call after merges touching the GPU path, kiln alone: GPU tests (test_models, the CUDA tests of
# test_bounded_cache and test_speculative) beside bench/gpu_engine_check.py, then bench/spec_cost.py (verify
# K+1 against a decode step, 8B-shape target and 0.6B-shape draft), bench/split_check.py (8B-shape Q4_K_M,
# 3 GiB GPU budget) and bench/quantizer_gpu_check.py (kiln's quantizers on the GPU: byte identity with
# llama.cpp's stored outputs). Output under $OUT: gpu_tests_*.log, engine_check.log, spec_cost.json,
# split_check.json, quantizer_gpu_check.log.
# Usage (repo root, .whl/ carried): OUT=dir bash bench/merge_check.sh
set -u
ROOT=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
. bench/carry_env.sh
START=$(date +%s); at() { echo "== $1 at $(( $(date +%s) - START )) s"; }
(for f in qwen3-0.6b qwen3-8b; do timeout 100 python bench/make_gguf.py --model $f --type Q4_K_M --out /tmp/g \
   > /dev/null 2>&1 || echo "make $f failed"; done) &
MK=$!
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_models.py > "$OUT/gpu_tests_test_models.log" 2>&1 &
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_bounded_cache.py -k cuda \
  > "$OUT/gpu_tests_test_bounded_cache.log" 2>&1 &
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_speculative.py -k cuda \
  > "$OUT/gpu_tests_test_speculative.log" 2>&1 &
timeout 150 python bench/gpu_engine_check.py > "$OUT/engine_check.log" 2>&1
tail -12 "$OUT/engine_check.log"
wait
for t in test_models test_bounded_cache test_speculative; do echo "$t: $(tail -1 "$OUT/gpu_tests_$t.log")"; done
at "tests"
timeout 90 python bench/spec_cost.py /tmp/g/qwen3-8b-Q4_K_M.gguf /tmp/g/qwen3-0.6b-Q4_K_M.gguf -n 20 \
  --accept bench/results/2026-12-04-cpu/spec_accept_cpu.json > "$OUT/spec_cost.json" 2> /tmp/spec.err; cat "$OUT/spec_cost.json"; tail -3 /tmp/spec.err
at "spec"
timeout 90 python bench/split_check.py /tmp/g/qwen3-8b-Q4_K_M.gguf --gpu-memory 3G > "$OUT/split_check.json" \
  2> /tmp/split.err; cat "$OUT/split_check.json"; tail -3 /tmp/split.err
at "split"
timeout 100 python bench/quantizer_gpu_check.py > "$OUT/quantizer_gpu_check.log" 2>&1; tail -4 "$OUT/quantizer_gpu_check.log"
at "quantizer"
