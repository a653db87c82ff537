#!/usr/bin/env bash
# One device call: the one-row int8 GEMV at decode shapes, timed in a graph (bench/gemv_ncu.py --time) and
# profiled by Nsight Compute. Usage, repo root, .whl carried: OUT=... SHAPES="Q4_K:16384:2048 ..." bash bench/gemv_ncu_session.sh
# SHAPES: format:n:k; CONFIGS: block_n:warps timed beside the table's at each shape;
# NCU: the profiled launches, format:n:k:block_n:warps (0: the table's), "" for none;
# TESTS: pytest arguments run first on the GPU (-> gpu_tests.log).
set -u
ROOT=$PWD
source bench/carry_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ -n "${TESTS:-}" ]; then
  eval timeout 240 python -m pytest -q -p no:cacheprovider $TESTS > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
fi
for s in ${SHAPES:-Q4_K:16384:2048 Q4_K:24576:4096}; do
  IFS=: read -r f n k <<< "$s"
  timeout 120 python bench/gemv_ncu.py --format $f --n $n --k $k --time --configs "${CONFIGS:-}" >> "$OUT/time.jsonl" 2>> "$OUT/time.err"
done
python -c "import json,sys
for l in open(sys.argv[1]): r = json.loads(l); c = r['config']; print(r['format'], r['n'], r['k'], c['block_n'], c['num_warps'], r['us'], r['tb_s'])" "$OUT/time.jsonl"
for s in ${NCU-Q4_K:16384:2048:0:0}; do
  IFS=: read -r f n k bn w <<< "$s"
  name=${s//:/_}  # ncu_<format_n_k_bn_warps>.txt
  timeout 150 ncu --set full --import-source no --clock-control none -k regex:_gemv_q8_kernel --launch-skip 3 \
    --launch-count 1 -f -o /tmp/ncu_$name python bench/gemv_ncu.py --format $f --n $n --k $k --block-n $bn \
    --warps $w > /tmp/ncu.log 2>&1
  ncu -i /tmp/ncu_$name.ncu-rep --page details > "$OUT/ncu_$name.txt" 2>&1
  ncu -i /tmp/ncu_$name.ncu-rep --page raw --csv > "$OUT/ncu_${name}_raw.csv" 2>&1
  echo "== $s"; grep -E "^    (Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Eligible Warps|Issued Warp|No Eligible)" "$OUT/ncu_$name.txt" | head -12
done
