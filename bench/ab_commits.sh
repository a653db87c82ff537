#!/usr/bin/env bash
# One device call: the same benchmarks on two commits side by side, alternating, in one call — for
# changes that must keep speed "within noise" (a refactor). The new side is this checkout; the old side
# is a `git archive` of the old commit unpacked in .ab/old (carried). Wheels the GPU machine lacks: .whl/ (carried,
# bench/carry_env.sh).
#
# Prepare here:  rm -rf .ab && mkdir -p .ab/old && git archive OLD_COMMIT | tar -x -C .ab/old
#                echo OLD_COMMIT > .ab/old/COMMIT; git rev-parse HEAD > .ab/NEW_COMMIT
# Run there:     FILES="qwen3-0.6b llama-3.2-1b" STEPS="bench engine" ROUNDS=2 bash bench/ab_commits.sh
#                (carry .ab and .whl)
# BENCH_ARGS: kiln bench's options (default -p 512 -g 128 -r 3; at depth: "-p 512 -g 128 -d 0,16384 -r 3").
# STEPS may also name `tests` (first: pytest $TESTS on the new side, e.g. TESTS="tests/test_ops.py -k 'argmax'",
# limit TESTS_S) and `timeline` (last: bench/graph_timeline.py on the new side, each file, at TIMELINE_DEPTH).
# Output under $OUT: ab.jsonl (one JSON per kiln bench run, with "side" and "round"), engine_*.json,
# gpu_tests.log, timeline.jsonl, ab.log. Every file is Q4_K_M from bench/make_gguf.py (seed 0), made here in /tmp/g.
set -u
ROOT=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
FILES=${FILES:-"qwen3-0.6b llama-3.2-1b"}
STEPS=${STEPS:-"bench engine"}
ROUNDS=${ROUNDS:-2}
BENCH_ARGS=${BENCH_ARGS:-"-p 512 -g 128 -r 3"}
START=$(date +%s); BUDGET=${BUDGET:-570}
left() { echo $((BUDGET - ($(date +%s) - START))); }
. bench/carry_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
side_path() { if [ "$1" = old ]; then echo "$ROOT/.ab/old"; else echo "$ROOT"; fi; }
# SIDES: the sides each round runs, in order; "new:VAR=value" is the new side with that variable set (an A/B of a
# kiln switch in the same alternation), e.g. SIDES="old new new:KILN_ROPE_ATTN=0"
SIDES=${SIDES:-"old new"}

for m in $FILES; do
  [ -f "/tmp/g/$m-Q4_K_M.gguf" ] && continue  # made earlier in this call (bench/gpu_session.sh's PRE_CMD)
  timeout 200 python bench/make_gguf.py --model "$m" --type Q4_K_M --out /tmp/g \
    > /dev/null 2>&1 || echo "make_gguf $m failed"
done
ls -la /tmp/g; echo "files made at $(( $(date +%s) - START )) s"

if [[ " $STEPS " == *" tests "* ]]; then  # the GPU tests of the new side, before any timing
  eval "timeout ${TESTS_S:-150} python -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_ops.py}" \
    > "$OUT/gpu_tests.log" 2>&1
  echo "tests: $(tail -1 "$OUT/gpu_tests.log")"
fi

if [[ " $STEPS " == *" bench "* ]]; then
  for m in $FILES; do
    for r in $(seq 1 "$ROUNDS"); do
      for side in $SIDES; do  # alternate: old, new, old, new …
        [ "$(left)" -lt 40 ] && { echo "out of time before $m $side round $r"; break 3; }
        dir=$(side_path "${side%%:*}")
        vars=""; [[ "$side" == *:* ]] && vars=${side#*:}  # the switch a "new:VAR=value" side sets
        (cd "$dir" && env $vars PYTHONPATH="/tmp/carry:$dir" timeout $(( $(left) - 10 )) python -m kiln.cli bench \
          --model "/tmp/g/$m-Q4_K_M.gguf" $BENCH_ARGS --json > /tmp/b.json 2> /tmp/b.err)
        rc=$?
        python - "$side" "$r" "$m" "$rc" >> "$OUT/ab.jsonl" <<'EOF'
import json, sys
side, r, m, rc = sys.argv[1:]
try:
    d = json.load(open("/tmp/b.json"))
except Exception as e:
    d = {"error": f"rc {rc}: {e}", "stderr": open("/tmp/b.err").read()[-800:]}
d.update(side=side, round=int(r), model=m)
print(json.dumps(d))
EOF
        python - <<'EOF'
import json
d = json.loads(open(__import__("os").environ["OUT"] + "/ab.jsonl").read().splitlines()[-1])
k = d.get("kiln")
one = lambda v: next(iter(v.values())) if isinstance(v, dict) else v  # newer bench: {length: tok/s}
print(d["model"], d["side"], d["round"], "error" if not k else
      f"pp {one(k['prefill_tok_s']):.0f} tg {one(k['decode_tok_s']):.1f} eff {one(k['effective_tok_s']):.1f} "
      f"load {d.get('load_s', 0):.1f}s capture {k.get('capture_s', 0):.1f}s", d.get("error", ""))
EOF
      done
    done
  done
fi

if [[ " $STEPS " == *" engine "* ]]; then  # continuous batching on the 1B shape, old and new alternating
  for r in $(seq 1 "$ROUNDS"); do
    for side in old new; do
      [ "$(left)" -lt 60 ] && { echo "out of time before engine $side round $r"; break 2; }
      dir=$(side_path $side)
      (cd "$dir" && PYTHONPATH="/tmp/carry:$dir" timeout 150 python bench/engine_bench.py \
        --model /tmp/g/llama-3.2-1b-Q4_K_M.gguf --streams 32 --tokens 128 --prompt-len 64 \
        --out "$OUT/engine_${side}_r$r.json" 2>&1 | tail -4)
      echo "== engine $side round $r at $(( $(date +%s) - START )) s"
    done
  done
fi
if [[ " $STEPS " == *" timeline "* ]]; then  # the new side's decode graph, kernel by kernel
  for m in $FILES; do
    [ "$(left)" -lt 30 ] && { echo "out of time before timeline $m"; break; }
    timeout $(( $(left) - 5 )) python bench/graph_timeline.py "/tmp/g/$m-Q4_K_M.gguf" \
      --depth "${TIMELINE_DEPTH:-16384}" >> "$OUT/timeline.jsonl" 2>> "$OUT/timeline.err"; echo "timeline $m rc=$?"
  done
fi
echo "done at $(( $(date +%s) - START )) s"
