#!/usr/bin/env bash
# One device call: build the random-weight GGUFs, time kiln end to end, check the quantized kernels on
# the GPU. Each step has its own time limit so a slow step cannot starve the ones after it; the most
# important come first. Usage (device machine, repo root, gguf-py carried in .carry/):
#   bash bench/gpu_session.sh
set -u
export PYTHONPATH="$PWD/.carry:$PWD"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
make() { timeout 60 python bench/make_gguf.py --model "$1" --type "$2" --out /tmp/g >> "$OUT/make.log" 2>&1; }
bench() {  # name, time limit
  timeout "$2" python -m kiln.cli bench --model "/tmp/g/$1.gguf" -p 512 -g 128 -r 3 --json \
    > "$OUT/bench_$1.json" 2> "$OUT/bench_$1.err"
  echo "== $1 rc=$?"; tail -c 300 "$OUT/bench_$1.err"
  grep -E '"(decode|prefill|effective)_tok_s"|roofline|capture' "$OUT/bench_$1.json"
}
make qwen3-0.6b Q4_K_M
bench qwen3-0.6b-Q4_K_M "${T1:-110}"
timeout "${T2:-90}" python -m pytest tests/test_quant_kernels.py -q -x > "$OUT/quant_kernels_pytest.log" 2>&1
echo "== kernel tests"; tail -3 "$OUT/quant_kernels_pytest.log"
make llama-3.2-1b Q4_K_M; bench llama-3.2-1b-Q4_K_M "${T3:-60}"
make qwen3-0.6b Q8_0; bench qwen3-0.6b-Q8_0 "${T3:-60}"
make qwen3-0.6b F16; bench qwen3-0.6b-F16 "${T3:-60}"
timeout "${T4:-60}" python bench/gpu_quant_check.py --quick > "$OUT/quant_check.log" 2>&1
echo "== quant check"; tail -20 "$OUT/quant_check.log"
