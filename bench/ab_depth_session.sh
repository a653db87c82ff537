#!/usr/bin/env bash
# One device call: this checkout ("new") against an old commit unpacked in .ab/old ("old", as bench/ab_commits.sh
# prepares it), alternating, `kiln bench -p 512 -g 128 -d 0,16384 -r 3` on make_gguf's Q4_K_M files (seed 0); first
# the GPU tests named in TESTS (new side). Usage, repo root, .ab and .whl carried:
#   FILES="llama-3.2-1b qwen3-8b" ROUNDS=2 TESTS="tests/test_ops.py -k rms_norm" OUT=... bash bench/ab_depth_session.sh
set -u
ROOT=$PWD
source bench/carry_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
FILES=${FILES:-"llama-3.2-1b qwen3-8b qwen3-0.6b"}; ROUNDS=${ROUNDS:-2}
START=$(date +%s); BUDGET=${BUDGET:-560}
left() { echo $((BUDGET - ($(date +%s) - START))); }
nvidia-smi --query-gpu=name --format=csv,noheader
(for f in $FILES; do [ -f /tmp/g/$f-Q4_K_M.gguf ] || python bench/make_gguf.py --model $f --type Q4_K_M --out /tmp/g \
   > /dev/null 2>&1; done; echo "files made at $(( $(date +%s) - START )) s") &
if [ -n "${TESTS:-}" ]; then
  eval "timeout ${TESTS_S:-150} python -m pytest -q -p no:cacheprovider $TESTS" > "$OUT/gpu_tests.log" 2>&1
  echo "tests: $(tail -1 "$OUT/gpu_tests.log")"
fi
wait
for r in $(seq 1 "$ROUNDS"); do for f in $FILES; do for side in old new; do
  [ "$(left)" -lt 45 ] && { echo "out of time at $f $side round $r"; break 3; }
  dir=$ROOT; [ $side = old ] && dir=$ROOT/.ab/old
  (cd "$dir" && PYTHONPATH="/tmp/carry:$dir" timeout $(( $(left) - 10 )) python -m kiln.cli bench \
    --model /tmp/g/$f-Q4_K_M.gguf -p 512 -g 128 -d 0,16384 -r 3 --json > /tmp/b.json 2> /tmp/b.err)
  python -c "import json; d=json.load(open('/tmp/b.json')); k=d['kiln']; print(json.dumps({'round': $r, 'file': '$f', 'side': '$side', 'tg': k.get('decode_tok_s'), 'user': k.get('decode_user_tok_s'), 'pp': k.get('prefill_tok_s')}))" \
    | tee -a "$OUT/ab_depth.jsonl" || tail -3 /tmp/b.err
done; done; done
if [ -n "${TIMELINE:-}" ]; then
  for f in $TIMELINE; do [ "$(left)" -lt 30 ] && break
    timeout $(( $(left) - 5 )) python bench/graph_timeline.py /tmp/g/$f-Q4_K_M.gguf --depth 16384 >> "$OUT/timeline.jsonl" \
      2>> "$OUT/timeline.err"; echo "timeline $f rc=$?"
  done
fi
