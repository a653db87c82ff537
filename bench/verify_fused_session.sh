#!/usr/bin/env bash
# One device call: the GPU checks of speculative checks through the fused kernels (bench/gpu_engine_check.py,
# test_ops attention / rope, test_speculative -k cuda) and their cost (bench/spec_cost.py on Qwen3-8B with a
# Qwen3-0.6B draft). Output under $OUT. Usage on the device, repo root, .whl/ carried.
ROOT=$PWD; source bench/carry_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python bench/gpu_engine_check.py > $OUT/gpu_engine_check.log 2>&1; echo "engine_check rc=$?"
tail -14 $OUT/gpu_engine_check.log
PYT="python -m pytest -q -p no:cacheprovider"
(timeout 200 $PYT tests/test_ops.py -k "attention or rope" > $OUT/t_ops.log 2>&1; echo "rc=$?" >> $OUT/t_ops.log) &
(timeout 200 $PYT tests/test_speculative.py -k cuda > $OUT/t_spec.log 2>&1; echo "rc=$?" >> $OUT/t_spec.log) &
mkdir -p /tmp/g
for f in qwen3-8b qwen3-0.6b; do
  [ -f /tmp/g/$f-Q4_K_M.gguf ] || timeout 150 python bench/make_gguf.py --model $f --type Q4_K_M --out /tmp/g \
    > /dev/null 2>&1
done
wait; for f in $OUT/t_ops.log $OUT/t_spec.log; do tail -n 2 "$f"; done
timeout 200 python bench/spec_cost.py /tmp/g/qwen3-8b-Q4_K_M.gguf /tmp/g/qwen3-0.6b-Q4_K_M.gguf \
  --accept bench/results/2026-12-04-cpu/spec_accept_cpu.json > $OUT/spec_cost.json 2>/tmp/sc.err
echo "spec_cost rc=$?"; tail -c 500 /tmp/sc.err; cat $OUT/spec_cost.json
