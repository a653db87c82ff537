#!/usr/bin/env bash
# One device call: greedy `kiln generate` of the same prompt with a kiln switch on and off, per file: the tokens a
# user gets must not change with a fused path (the kernel tests compare the kernels; this, the whole decode step in
# its CUDA graph). CHECKS: "file:VARIABLE ..." (make_gguf Q4_K_M files, made here in /tmp/g). Carry .whl.
# Output under $OUT: gen_<file>_<VARIABLE>_<0|1>.txt and one line per check, "same" or "DIFFER".
set -u
ROOT=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
. bench/carry_env.sh
CHECKS=${CHECKS:-"llama-3.2-1b:KILN_GEMV_ROPE qwen3-0.6b:KILN_PAIR_GEMV"}
for c in $CHECKS; do
  m=${c%%:*}; var=${c##*:}
  [ -f "/tmp/g/$m-Q4_K_M.gguf" ] || timeout 200 python bench/make_gguf.py --model "$m" --type Q4_K_M --out /tmp/g > /dev/null
  for v in 1 0; do
    env "$var=$v" timeout 120 python -m kiln.cli generate -m "/tmp/g/$m-Q4_K_M.gguf" --no-chat-template \
      --prompt "${PROMPT:-The history of the printing press}" --max-tokens "${TOKENS:-96}" --temp 0 \
      > "$OUT/gen_${m}_${var}_$v.txt" 2> "$OUT/gen_${m}_${var}_$v.err"
  done
  if cmp -s "$OUT/gen_${m}_${var}_1.txt" "$OUT/gen_${m}_${var}_0.txt" && [ -s "$OUT/gen_${m}_${var}_1.txt" ]; then
    echo "$m $var: same ($(wc -c < "$OUT/gen_${m}_${var}_1.txt") bytes)"
  else
    echo "$m $var: DIFFER"; tail -3 "$OUT/gen_${m}_${var}_1.err"
  fi
done
