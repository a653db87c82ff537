#!/usr/bin/env bash
# One device call: cold start of this checkout against the one in .ab/old (bench/cold_start.py, alternating, on the
# GPU), Llama-3.2-1B Q4_K_M (make_gguf, seed 0), with bytecode written once and read after, as an installed
# environment runs. Prepare here: rm -rf .ab && mkdir -p .ab/old && git archive OLD | tar -x -C .ab/old
# Then bench/cold_timeline.py of each checkout (timeline_old.txt, timeline_new.txt); with TESTS=1 tests/test_startup.py
# (the driver-begun context is torch's), with PROFILE=1 bench/cold_profile.sh of this checkout.
# Usage (repo root, .whl and .ab carried): OUT=... RUNS=3 [LIMIT=240, 0: no cold_start.py] [TESTS=1] [PROFILE=1] \
#   bash bench/cold_warm_session.sh
set -u
ROOT=$PWD
source bench/carry_env.sh
unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pyc
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/device.txt"
python bench/make_gguf.py --model llama-3.2-1b --type Q4_K_M --out /tmp/g > /dev/null 2>&1
if [ "${LIMIT:-240}" != 0 ]; then  # LIMIT=0: the timelines alone
  timeout ${LIMIT:-240} python bench/cold_start.py --model /tmp/g/llama-3.2-1b-Q4_K_M.gguf --checkout .ab/old \
    --checkout . --runs ${RUNS:-3} --device cuda | tee "$OUT/cold_start.jsonl"
fi
for side in old:.ab/old new:.; do  # each stage's start and end on one timeline, both checkouts (cold_timeline.py)
  timeout 120 python bench/cold_timeline.py --warm 1 --runs ${RUNS:-3} --checkout ${side#*:} -- \
    --model /tmp/g/llama-3.2-1b-Q4_K_M.gguf --prompt hi --max-tokens 1 --device cuda > "$OUT/timeline_${side%%:*}.txt"
  tail -25 "$OUT/timeline_${side%%:*}.txt"
done
if [ -n "${TESTS:-}" ]; then python -m pytest -q tests/test_startup.py 2>&1 | tail -3 | tee "$OUT/test_startup.txt"; fi
if [ -n "${PROFILE:-}" ]; then OUT="$OUT/profile" timeout 200 bash bench/cold_profile.sh /tmp/g/llama-3.2-1b-Q4_K_M.gguf; fi
