#!/usr/bin/env bash
# One device call: bench/fusion_bound.py's floors (kernels not launched) against the plain step, depth 16384,
# alternating, on make_gguf Q4_K_M files (seed 0). Usage, repo root, .whl/ carried:
#   OUT=... [MODELS="qwen3-8b llama-3.2-1b qwen3-0.6b"] [SKIPS="none norm+act+rope norm norm+act none"] \
#   bash bench/fusion_bound_session.sh
set -u
ROOT=$PWD
source bench/carry_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
nvidia-smi --query-gpu=name --format=csv,noheader
for f in ${MODELS:-qwen3-8b llama-3.2-1b qwen3-0.6b}; do
  [ -f /tmp/g/$f-Q4_K_M.gguf ] || python bench/make_gguf.py --model $f --type Q4_K_M --out /tmp/g > /dev/null 2>&1
  for s in ${SKIPS:-none norm+act+rope norm norm+act none}; do
    timeout 120 python bench/fusion_bound.py /tmp/g/$f-Q4_K_M.gguf --skip "$( [ $s = none ] || echo ${s//+/,})" --depth ${DEPTH:-16384} \
      --steps 10 | python -c "import json,sys; d=json.loads(sys.stdin.read()); d['skip']='$s'; print(json.dumps(d))" \
      >> "$OUT/bound.jsonl" 2>> "$OUT/bound.err"; echo "$f skip '$s' rc=$?"
  done
done
