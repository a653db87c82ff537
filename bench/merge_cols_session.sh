#!/usr/bin/env bash
# One device call: decode attention's merge as column programs (ops.attention.MERGE_COLS / MERGE_ELEMS: each program
# a row's 32 columns, the splits a chunk at a time) against one program a row holding every split (the form before,
# `128:1048576`), and with it fewer tiles a split (more programs), alone at depth 16384 (bench/read_ceiling.py) and,
# for the fastest setting of each head dim, in the whole model (bench/decode_ab.py, depth 16384).
# Usage, repo root, .whl carried: OUT=... bash bench/merge_cols_session.sh  (MODELS: make_gguf names to run in the
# model; TESTS=1 also runs the GPU decode-attention tests)
set -u
ROOT=$PWD
source bench/carry_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/device.txt"
OLD=128:1048576
MERGES=$OLD,32:4096
timeout 170 python bench/read_ceiling.py --no-reads --layers 12 --shapes llama-3.2-1b --merges $MERGES \
  --launches 64:4:2:1,64:4:2:2,128:4:2:1,32:4:2:1,64:4:2:2:1:1,64:2:2:1,128:4:2:2 > "$OUT/split.jsonl"
timeout 230 python bench/read_ceiling.py --no-reads --layers 12 --shapes qwen3-0.6b,qwen3-8b --merges $MERGES \
  --launches 64:4:2:1,64:8:2:1,64:4:2:2:1:1,64:8:2:2:1:1,32:4:2:1,64:8:2:4:1:1,64:4:2:4:1:1,128:8:2:1 \
  >> "$OUT/split.jsonl"
# The fastest setting alone per head dim (the 8B's for 128) -> decode_ab.py's list: old merge, new merge, that one.
python - "$OUT/split.jsonl" > "$OUT/pick.txt" <<'EOF'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if '"us_layer"' in x]
for shape, dim in (("llama-3.2-1b", 64), ("qwen3-8b", 128)):
    r = [x for x in rows if x["shape"] == shape]
    for x in sorted(r, key=lambda x: x["us_layer"])[:6]:
        print("#", shape, x["us_layer"], x["launch"], x["merge"], file=sys.stderr)
    best = min(r, key=lambda x: x["us_layer"])
    pick = dict(best["launch"] or {}, merge_cols=best["merge"][0], merge_elems=best["merge"][1])
    print(dim, json.dumps([{"merge_cols": 128, "merge_elems": 1048576}, {}, pick]))
EOF
cat "$OUT/pick.txt"
for f in ${MODELS:-llama-3.2-1b qwen3-0.6b}; do
  python bench/make_gguf.py --model $f --type Q4_K_M --out /tmp/g > /dev/null 2>&1
  case $f in llama-3.2-1b) dim=64;; *) dim=128;; esac
  L=$(grep "^$dim " "$OUT/pick.txt" | cut -d' ' -f2-)
  timeout ${AB_LIMIT:-150} python bench/decode_ab.py --model /tmp/g/$f-Q4_K_M.gguf --depth 16384 \
    --json "$OUT/ab_$f.json" --launches "$L" > "$OUT/ab_$f.log" 2>&1; echo "$f rc=$?"; grep "^tg" "$OUT/ab_$f.log"
done
if [ -n "${TESTS:-}" ]; then
  timeout 200 python -m pytest -q -p no:cacheprovider tests/test_ops.py -k "decode_attention" > "$OUT/gpu_tests.log" 2>&1
  echo "tests rc=$?"; tail -3 "$OUT/gpu_tests.log"
fi
