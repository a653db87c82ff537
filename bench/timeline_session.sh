#!/usr/bin/env bash
# One device call (kiln only, no llama.cpp): bench/graph_timeline.py's kernel-by-kernel breakdown of the decode
# step's CUDA graph at depth 16384 and 0 (Qwen3-8B, Llama-3.2-1B, Qwen3-0.6B Q4_K_M, make_gguf seed 0), with the
# plain-read ceiling for one layer's KV bytes. SKIPS: also the step with kernels not launched (bench/fusion_bound.py,
# e.g. SKIPS="none norm+act+rope norm+act": a fusion's floor; each record gets "skip"). Usage, repo root, .whl/
# carried: OUT=... [MODELS=...] [DEPTHS="16384 0"] [SKIPS=none] bash bench/timeline_session.sh
set -u
ROOT=$PWD
source bench/carry_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
nvidia-smi --query-gpu=name --format=csv,noheader
for f in ${MODELS:-qwen3-8b llama-3.2-1b qwen3-0.6b}; do
  [ -f /tmp/g/$f-Q4_K_M.gguf ] || python bench/make_gguf.py --model $f --type Q4_K_M --out /tmp/g > /dev/null 2>&1
  for d in ${DEPTHS:-16384 0}; do
    for s in ${SKIPS:-none}; do
      timeout 120 python bench/fusion_bound.py /tmp/g/$f-Q4_K_M.gguf --skip "$( [ $s = none ] || echo ${s//+/,})" \
        --depth $d --read-ceiling >> "$OUT/timeline.jsonl" 2>> "$OUT/timeline.err"; echo "$f depth $d skip $s rc=$?"
    done
  done
done
