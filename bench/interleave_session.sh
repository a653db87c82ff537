#!/usr/bin/env bash
# One device call: decode attention with interleaved splits (ops.attention.Launch.interleave: split s takes tiles
# s, s + NS, ...) against the default runs, alone on distinct per-layer buffers (bench/read_ceiling.py, with
# strided plain reads beside one-run ones) and in the whole model at depth 16384 (bench/decode_ab.py).
# Usage, repo root, .whl carried: OUT=... MODELS="llama-3.2-1b qwen3-0.6b" bash bench/interleave_session.sh
# (ISOLATED="" skips the kernel-alone part; L_64 / L_128: the decode_ab.py --launches lists by head dim; TESTS=1 also
# runs the GPU decode-attention tests)
set -u
ROOT=$PWD
source bench/carry_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/device.txt"
if [ -n "${ISOLATED-1}" ]; then
  timeout 120 python bench/read_ceiling.py --layers 12 --shapes llama-3.2-1b \
    --launches 64:4:2:4:1:1,64:4:2:8:1:1,64:4:2:2:1:1,128:4:2:4:1:1,64:4:3:4:1:1 | tee "$OUT/interleave_1b.jsonl"
  timeout 150 python bench/read_ceiling.py --layers 12 --shapes qwen3-8b \
    --launches 64:8:2:8:1:1,64:8:2:16:1:1,64:8:2:4:1:1,64:4:2:8:1:1,64:8:3:8:1:1 | tee "$OUT/interleave_d128.jsonl"
fi
for f in ${MODELS:-llama-3.2-1b qwen3-0.6b}; do
  python bench/make_gguf.py --model $f --type Q4_K_M --out /tmp/g > /dev/null 2>&1
  case $f in
    llama-3.2-1b) L=${L_64:-'[{}, {"interleave": true}, {"interleave": true, "tiles_per_split": 8}]'};;
    *) L=${L_128:-'[{}, {"warps": 8, "tiles_per_split": 8, "interleave": true}, {"warps": 8, "tiles_per_split": 16, "interleave": true}]'};;
  esac
  timeout ${AB_LIMIT:-200} python bench/decode_ab.py --model /tmp/g/$f-Q4_K_M.gguf --depth 16384 --json "$OUT/ab_$f.json" \
    --launches "$L" > "$OUT/ab_$f.log" 2>&1; echo "$f rc=$?"; tail -8 "$OUT/ab_$f.log"
done
if [ -n "${TESTS:-}" ]; then
  timeout 200 python -m pytest -q -p no:cacheprovider tests/test_ops.py -k "decode_attention" > "$OUT/gpu_tests.log" 2>&1
  echo "tests rc=$?"; tail -3 "$OUT/gpu_tests.log"
fi
