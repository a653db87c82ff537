#!/usr/bin/env bash
# One device call: cold start of this checkout against the one in .ab/old (bench/cold_start.py, alternating, on the
# GPU), Llama-3.2-1B Q4_K_M (make_gguf, seed 0), with bytecode written once and read after, as an installed
# environment runs. Prepare here: rm -rf .ab && mkdir -p .ab/old && git archive OLD | tar -x -C .ab/old
# Then tests/test_startup.py (the driver-begun context is torch's) and bench/cold_profile.sh of this checkout.
# Usage (repo root, .whl and .ab carried): OUT=... RUNS=3 bash bench/cold_warm_session.sh
set -u
ROOT=$PWD
source bench/carry_env.sh
unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pyc
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/device.txt"
python bench/make_gguf.py --model llama-3.2-1b --type Q4_K_M --out /tmp/g > /dev/null 2>&1
timeout ${LIMIT:-240} python bench/cold_start.py --model /tmp/g/llama-3.2-1b-Q4_K_M.gguf --checkout .ab/old --checkout . \
  --runs ${RUNS:-3} --device cuda | tee "$OUT/cold_start.jsonl"
python -m pytest -q tests/test_startup.py 2>&1 | tail -3 | tee "$OUT/test_startup.txt"
OUT="$OUT/profile" timeout 200 bash bench/cold_profile.sh /tmp/g/llama-3.2-1b-Q4_K_M.gguf
