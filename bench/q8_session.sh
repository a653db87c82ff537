#!/usr/bin/env bash
# One device call: the q8_0 KV cache read directly by the fused decode kernel, on the GPU: the attention tests
# (bf16 cases run only here), bench/gpu_kv_rot_check.py (rotated caches in graphs and the engine), then
# bench/kv_direct_check.py on the Qwen3-8B and Qwen3-0.6B Q4_K_M shapes (accuracy, in-graph kernel time
# against bf16 and against dequantizing the whole cache, whole-model decode after 16384 tokens).
# Output under $OUT: gpu_tests_attention.log, kv_rot_check.txt, kv_direct_MODEL.jsonl, session.log.
set -u
ROOT=$PWD; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
START=$(date +%s)
. bench/carry_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for m in qwen3-8b qwen3-0.6b; do
  timeout 120 python bench/make_gguf.py --model $m --type Q4_K_M --out /tmp/g > /dev/null 2>&1 || echo "make_gguf $m failed"
done
echo "files at $(( $(date +%s) - START )) s"
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_ops.py -k "attention" > "$OUT/gpu_tests_attention.log" 2>&1
echo "tests: $(tail -1 "$OUT/gpu_tests_attention.log") at $(( $(date +%s) - START )) s"
grep -E "FAILED|Error" "$OUT/gpu_tests_attention.log" | head -10
timeout 90 python bench/gpu_kv_rot_check.py > "$OUT/kv_rot_check.txt" 2>&1; echo "kv_rot rc=$?"; tail -12 "$OUT/kv_rot_check.txt"
echo "rot at $(( $(date +%s) - START )) s"
for m in qwen3-8b qwen3-0.6b; do
  timeout 150 python bench/kv_direct_check.py /tmp/g/$m-Q4_K_M.gguf > "$OUT/kv_direct_$m.jsonl" 2>/tmp/kv.err
  echo "== $m rc=$? at $(( $(date +%s) - START )) s"; tail -3 /tmp/kv.err; cut -c 1-400 "$OUT/kv_direct_$m.jsonl"
done
