#!/usr/bin/env bash
# One device call: build the random-weight GGUFs, check the quantized kernels on the GPU, then time
# kiln end to end. Each step has its own time limit so a slow step cannot starve the ones after it.
# Usage (device machine, repo root, gguf-py carried in .carry/): bash bench/gpu_session.sh
set -u
export PYTHONPATH="$PWD/.carry:$PWD"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
for spec in "qwen3-0.6b Q4_K_M" "qwen3-0.6b Q8_0" "qwen3-0.6b F16" "llama-3.2-1b Q4_K_M"; do
  set -- $spec; timeout 60 python bench/make_gguf.py --model "$1" --type "$2" --out /tmp/g >> "$OUT/make.log" 2>&1
done
for f in qwen3-0.6b-Q4_K_M qwen3-0.6b-Q8_0 qwen3-0.6b-F16 llama-3.2-1b-Q4_K_M; do
  timeout ${BENCH_TIMEOUT:-70} python -m kiln.cli bench --model /tmp/g/$f.gguf -p 512 -g 128 -r 3 --json \
    > "$OUT/bench_$f.json" 2> "$OUT/bench_$f.err"
  tail -c 400 "$OUT/bench_$f.err"; grep -E '"(decode|prefill|effective)_tok_s"|roofline' "$OUT/bench_$f.json"
done
timeout ${KERNEL_TIMEOUT:-120} python -m pytest tests/test_quant_kernels.py -q -x > "$OUT/quant_kernels_pytest.log" 2>&1
tail -3 "$OUT/quant_kernels_pytest.log"
timeout ${CHECK_TIMEOUT:-120} python bench/gpu_quant_check.py > "$OUT/quant_check.log" 2>&1
tail -25 "$OUT/quant_check.log"
