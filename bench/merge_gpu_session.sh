#!/usr/bin/env bash
# One device call after the KV-rotation merge and the CPU kernels: the rotated q8_0 / q4_0 cache on the GPU
# (bench/gpu_kv_rot_check.py), a server cache's capacity per type in one KV budget on a real-config file
# (bench/kv_capacity.py), and where a CPU + GPU split's decode time goes (bench/split_profile.py).
# Output under $OUT. Usage on the device, repo root, .whl/ carried: bash bench/merge_gpu_session.sh
# (FILES=qwen3-0.6b:Q4_K_M: without the 8B file, no split profile)
set -u
ROOT=$PWD; source bench/carry_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
for f in ${FILES:-qwen3-0.6b:Q4_K_M qwen3-8b:Q4_K_M}; do
  [ -f "/tmp/g/${f%%:*}-${f##*:}.gguf" ] || timeout 240 python bench/make_gguf.py --model "${f%%:*}" --type "${f##*:}" --out /tmp/g > /dev/null 2>&1
done
timeout 150 python bench/gpu_kv_rot_check.py 2>&1 | tee "$OUT/gpu_kv_rot_check.log" | tail -20
timeout 150 python bench/kv_capacity.py --model /tmp/g/qwen3-0.6b-Q4_K_M.gguf --budget 2GiB --parallel 8 --device cuda \
  --dtype bfloat16 2>&1 | tee "$OUT/kv_capacity.jsonl" | tail -5
[ -f /tmp/g/qwen3-8b-Q4_K_M.gguf ] && timeout 200 python bench/split_profile.py /tmp/g/qwen3-8b-Q4_K_M.gguf 2>&1 | tee "$OUT/split_profile.txt" | tail -40
