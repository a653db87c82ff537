#!/usr/bin/env bash
# One device call: bench/kv_prefetch_ab.py's probe (does cp.async.bulk.prefetch.L2 land, how fast is the read after
# it), then tg128 at depth 16384 with a layer's keys and values asked for early, per model. make_gguf Q4_K_M files
# (seed 0). Usage, repo root, .whl/ carried:
#   OUT=... [MODELS="llama-3.2-1b qwen3-0.6b qwen3-8b"] [VARIANTS='[{}, {"where": "start"}]'] [BUDGET=400] \
#   bash bench/kv_prefetch_session.sh
set -u
ROOT=$PWD; source bench/carry_env.sh; mkdir -p "$OUT" /tmp/g
START=$(date +%s); left() { echo $((${BUDGET:-400} - ($(date +%s) - START))); }
nvidia-smi --query-gpu=name --format=csv,noheader
MODELS=${MODELS:-llama-3.2-1b qwen3-0.6b qwen3-8b}
for m in $MODELS; do
  timeout 100 python bench/make_gguf.py --model $m --type Q4_K_M --out /tmp/g > /dev/null 2>&1 || echo "make_gguf $m failed"
done
timeout 60 python bench/kv_prefetch_ab.py --probe --json "$OUT/probe.json" 2>&1 | tail -8
for m in $MODELS; do
  [ "$(left)" -lt 40 ] && { echo "out of time before $m"; break; }
  timeout $(( $(left) - 5 )) python bench/kv_prefetch_ab.py --model /tmp/g/$m-Q4_K_M.gguf --depth 16384 \
    ${VARIANTS:+--variants "$VARIANTS"} --json "$OUT/ab_$m.json" 2>&1 | grep -E "^tg|Error|error" | tail -12
  echo "== $m at $(( $(date +%s) - START )) s"
done
