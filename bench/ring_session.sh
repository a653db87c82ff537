#!/usr/bin/env bash
# One device call (or gpu_session.sh's PRE_CMD): ring (sliding-window) layers in the fused CUDA-graph decode
# step. GPU tests first (the captured Decoder with rings against the CPU reference, the ring-slot write and
# last-slot read against their references), then `kiln bench` on the Gemma-3-1B shape (bench/make_gguf.py,
# Q4_K_M, window 512: 5 of 6 layers in rings once the context passes 512) on two commits alternating: the old
# side (ring layers unfused: RoPE, an index write, masked SDPA) from .ab/old, the new side this checkout.
# Prepare here: rm -rf .ab && mkdir -p .ab/old && git archive OLD | tar -x -C .ab/old (carry .ab and .whl).
# Output under $OUT: gpu_tests_ring.log, ring_ab.jsonl (one kiln bench JSON per run, "side" and "round").
set -u
ROOT=$PWD; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
START=$(date +%s)
. bench/carry_env.sh
[ -f /tmp/g/gemma-3-1b-Q4_K_M.gguf ] || timeout 120 python bench/make_gguf.py --model gemma-3-1b --type Q4_K_M \
  --out /tmp/g > /dev/null 2>&1 &
{ timeout 150 python -m pytest -q -p no:cacheprovider tests/test_bounded_cache.py -k "cuda"
  timeout 120 python -m pytest -q -p no:cacheprovider tests/test_ops.py -k "ring"; } > "$OUT/gpu_tests_ring.log" 2>&1
grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests_ring.log" | head -12
echo "ring tests at $(( $(date +%s) - START )) s"
wait
for r in $(seq 1 ${RING_ROUNDS:-2}); do
  for side in old new; do
    [ $(( $(date +%s) - START )) -gt ${RING_BUDGET:-330} ] && { echo "skip $side $r: time"; continue; }
    dir=$ROOT; [ $side = old ] && dir=$ROOT/.ab/old
    [ -d "$dir/kiln" ] || { echo "no $dir"; continue; }
    (cd "$dir" && PYTHONPATH="/tmp/carry:$dir" timeout 150 python -m kiln.cli bench \
      --model /tmp/g/gemma-3-1b-Q4_K_M.gguf -p 512 -d 0,4096 -g 128 -r 3 --json > /tmp/rb.json 2> /tmp/rb.err)
    python - "$side" "$r" "$?" >> "$OUT/ring_ab.jsonl" <<'PY'
import json, sys
side, r, rc = sys.argv[1:]
try:
    d = json.load(open("/tmp/rb.json"))
except Exception as e:
    d = {"error": f"rc {rc}: {e}", "stderr": open("/tmp/rb.err").read()[-800:]}
d.update(side=side, round=int(r), model="gemma-3-1b")
print(json.dumps(d))
k = d.get("kiln") or {}
print(side, r, k.get("decode_tok_s"), k.get("decode_user_tok_s"), d.get("error", ""), file=sys.stderr)
PY
  done
done
echo "ring session done at $(( $(date +%s) - START )) s"
