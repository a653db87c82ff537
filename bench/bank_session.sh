#!/usr/bin/env bash
# One device call: several adapters served from one GPU load (bench/gpu_bank_check.py), one adapter over the
# GPU load (bench/gpu_adapter_check.py), and `kiln finetune --device cuda` at its default dtype (bfloat16) beside
# --dtype float32, on a random-weight Qwen3-0.6B Q4_K_M (bench/make_gguf.py). Output under $OUT.
# Usage on the device machine, repo root, .whl/ carried:  bash bench/bank_session.sh
set -u
ROOT=$PWD
. bench/carry_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
M=/tmp/g/qwen3-0.6b-Q4_K_M.gguf
[ -f $M ] || python bench/make_gguf.py --model qwen3-0.6b --type Q4_K_M --out /tmp/g > /dev/null
timeout 330 python bench/gpu_bank_check.py $M --streams 16 --tokens 64 > "$OUT/bank_check.json" 2> "$OUT/bank_check.err"
echo "bank_check rc $?"
python - <<'PY'
import json, os
os.makedirs("/tmp/ft", exist_ok=True)
for split in ("train", "valid"):
    with open(f"tests/data/finetune/{split}.jsonl") as f, open(f"/tmp/ft/{split}.jsonl", "w") as o:
        for line in f:
            m = json.loads(line)["messages"]
            o.write(json.dumps({"text": m[0]["content"] + "\n" + m[1]["content"]}) + "\n")
PY
for dt in default float32; do
  extra=""; [ $dt = default ] || extra="--dtype $dt"
  timeout 90 python -m kiln.cli finetune --model $M --data /tmp/ft --iters 30 --batch-size 4 --device cuda \
    --steps-per-eval 1000 --adapter-path /tmp/ad-$dt $extra > "$OUT/finetune_$dt.log" 2>&1
  echo "finetune $dt rc $?"
done
timeout 120 python bench/gpu_adapter_check.py $M > "$OUT/adapter_check.json" 2> "$OUT/adapter_check.err"
echo "adapter_check rc $?"
