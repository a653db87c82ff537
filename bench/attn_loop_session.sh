#!/usr/bin/env bash
# One device call: the split-KV decode kernel's loop run to each split's own tile count (runtime bound)
# against the worst-case loop with masked tiles (the old default for head dim 128): the attention tests on
# the GPU, bench/attn_sweep.py --focus (both loop forms), then `kiln bench -d 0,4096,16384` old vs new
# (alternating; old = the `git archive` in .ab/old) on the three Q4_K_M shapes, kiln alone.
# Output under $OUT: gpu_tests_attention.log, attn_sweep_loop.jsonl, ab_depth.jsonl, session.log.
# Usage on the device, repo root, .whl/ and .ab/ carried: bash bench/attn_loop_session.sh
set -u
ROOT=$PWD; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
START=$(date +%s)
. bench/carry_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for m in qwen3-8b llama-3.2-1b qwen3-0.6b; do
  timeout 120 python bench/make_gguf.py --model $m --type Q4_K_M --out /tmp/g > /dev/null 2>&1 || echo "make_gguf $m failed"
done
echo "files at $(( $(date +%s) - START )) s"
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_ops.py -k "attention" > "$OUT/gpu_tests_attention.log" 2>&1
echo "tests: $(tail -1 "$OUT/gpu_tests_attention.log") at $(( $(date +%s) - START )) s"
timeout 90 python bench/attn_sweep.py --depths 16384,4096 --focus --budget 75 > "$OUT/attn_sweep_loop.jsonl" 2>/tmp/sweep.err
tail -2 /tmp/sweep.err; tail -1 "$OUT/attn_sweep_loop.jsonl" | cut -c 1-1200
echo "sweep at $(( $(date +%s) - START )) s"
for m in qwen3-8b qwen3-0.6b llama-3.2-1b; do for side in old new; do
  [ $(( $(date +%s) - START )) -gt 540 ] && break 2
  dir=$ROOT; [ $side = old ] && dir=$ROOT/.ab/old
  (cd "$dir" && PYTHONPATH="/tmp/carry:$dir" timeout 100 python -m kiln.cli bench --model /tmp/g/$m-Q4_K_M.gguf \
     -p 512 -d 0,4096,16384 -g 128 -r 3 --json > /tmp/b.json 2>/tmp/b.err)
  echo "== $m $side rc=$? at $(( $(date +%s) - START )) s"; tail -c 300 /tmp/b.err
  python - "$m" "$side" <<'PY' | tee -a "$OUT/ab_depth.jsonl"
import json, sys
d = json.load(open("/tmp/b.json")); k = d["kiln"]
print(json.dumps({"model": sys.argv[1], "side": sys.argv[2], "tg": k["decode_tok_s"], "user": k["decode_user_tok_s"],
                  "device_at_prompt": k.get("decode_device_at_prompt_tok_s"), "pp512": k["prefill_tok_s"]}))
PY
done; done
