#!/usr/bin/env bash
# One device call (kiln only): decode attention's launch settings in the whole model at depth 16384
# (bench/decode_ab.py --launches: each setting a fresh Decoder, each twice, interleaved), Llama-3.2-1B (head dim 64)
# and Qwen3-8B (head dim 128), make_gguf Q4_K_M seed 0. Usage, repo root, .whl carried: OUT=... bash bench/launch_session.sh
set -u
ROOT=$PWD
source bench/carry_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
nvidia-smi --query-gpu=name --format=csv,noheader
for f in llama-3.2-1b qwen3-8b; do python bench/make_gguf.py --model $f --type Q4_K_M --out /tmp/g > /dev/null 2>&1; done
timeout 200 python bench/decode_ab.py --model /tmp/g/llama-3.2-1b-Q4_K_M.gguf --depth 16384 --json "$OUT/launch_1b.json" \
  --launches '[{}, {"tiles_per_split": 8}, {"block_n": 128}, {"block_n": 128, "tiles_per_split": 8}, {"block_n": 128, "stages": 3}, {"warps": 8, "block_n": 128}, {"stages": 3}]' \
  > "$OUT/launch_1b.log" 2>&1; echo "1b rc=$?"
timeout 260 python bench/decode_ab.py --model /tmp/g/qwen3-8b-Q4_K_M.gguf --depth 16384 --json "$OUT/launch_8b.json" \
  --launches '[{}, {"warps": 8, "tiles_per_split": 8, "stages": 3}, {"warps": 8, "tiles_per_split": 16}, {"warps": 8, "tiles_per_split": 4}, {"warps": 4, "tiles_per_split": 8, "stages": 3}, {"warps": 8, "tiles_per_split": 8, "block_n": 32, "stages": 4}, {"block_n": 128, "warps": 8, "tiles_per_split": 4}]' \
  > "$OUT/launch_8b.log" 2>&1; echo "8b rc=$?"
