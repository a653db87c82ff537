#!/usr/bin/env bash
# One device call: cold `kiln generate --max-tokens 1` on the Llama-3.2-1B Q4_K_M file (make_gguf, seed 0) as the
# device's Python runs (PYTHONDONTWRITEBYTECODE=1: every import compiles its source again) and as an installed
# environment runs (bytecode written once, then read: PYTHONPYCACHEPREFIX). bench/cold_profile.sh for each.
# Usage (repo root, .whl carried): OUT=... bash bench/cold_bytecode.sh
set -u
ROOT=$PWD
source bench/carry_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/device.txt"
python -c "import sys, os; print('dont_write_bytecode', sys.flags.dont_write_bytecode, 'PYTHONDONTWRITEBYTECODE', os.environ.get('PYTHONDONTWRITEBYTECODE'))" | tee "$OUT/env.txt"
python bench/make_gguf.py --model llama-3.2-1b --type Q4_K_M --out /tmp/g > /dev/null 2>&1
M=/tmp/g/llama-3.2-1b-Q4_K_M.gguf
TIMEFORMAT=%R
for mode in as_is bytecode; do
  mkdir -p "$OUT/$mode"
  if [ $mode = bytecode ]; then unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pyc; fi
  for i in 1 2 3; do { time python -c "import torch"; } 2>&1 | sed "s/^/$mode import torch s: /"; done | tee "$OUT/$mode/import_torch.txt"
  OUT="$OUT/$mode" timeout 200 bash bench/cold_profile.sh "$M"
done
