#!/usr/bin/env bash
# One device call: block-type KV caches (q8_0, q4_0) written by ops/kv_write.py's kernel and read directly by the
# decode kernel (which rotates the output back). GPU tests of the kernels (bf16 cases run only here),
# bench/gpu_kv_rot_check.py (graphs == eager, engine == solo), then bench/kv_direct_check.py on the Qwen3-8B
# Q4_K_M shape (accuracy, in-graph kernel time, whole-model decode after 16384 tokens for each cache type), and
# the Qwen3-0.6B shape if time is left (KVQ_MODELS: which). Output under $OUT: gpu_tests_kv.log, kv_rot_check.txt,
# kv_direct_MODEL.jsonl. Also bench/gpu_session.sh's PRE_CMD (while llama.cpp builds).
set -u
ROOT=$PWD; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
START=$(date +%s)
. bench/carry_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
MODELS=${KVQ_MODELS-qwen3-8b qwen3-0.6b}  # set but blank: the tests and checks only
first=$(echo $MODELS | cut -d' ' -f1)
[ -z "$first" ] || [ -f /tmp/g/$first-Q4_K_M.gguf ] || timeout 150 python bench/make_gguf.py --model $first \
  --type Q4_K_M --out /tmp/g > /dev/null 2>&1 &
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_ops.py -k "attention or block_caches or encode_kv" \
  > "$OUT/gpu_tests_kv.log" 2>&1
echo "tests: $(tail -1 "$OUT/gpu_tests_kv.log") at $(( $(date +%s) - START )) s"
grep -E "FAILED|Error" "$OUT/gpu_tests_kv.log" | head -10
timeout 90 python bench/gpu_kv_rot_check.py > "$OUT/kv_rot_check.txt" 2>&1; echo "kv_rot rc=$?"; tail -12 "$OUT/kv_rot_check.txt"
echo "rot at $(( $(date +%s) - START )) s"
wait
for m in $MODELS; do
  [ $(( $(date +%s) - START )) -gt 380 ] && { echo "skip $m: time"; continue; }
  [ -f /tmp/g/$m-Q4_K_M.gguf ] || timeout 60 python bench/make_gguf.py --model $m --type Q4_K_M --out /tmp/g > /dev/null 2>&1
  timeout 170 python bench/kv_direct_check.py /tmp/g/$m-Q4_K_M.gguf > "$OUT/kv_direct_$m.jsonl" 2>/tmp/kv.err
  echo "== $m rc=$? at $(( $(date +%s) - START )) s"; tail -3 /tmp/kv.err; cut -c 1-500 "$OUT/kv_direct_$m.jsonl"
done
