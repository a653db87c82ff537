#!/usr/bin/env bash
# One device call: decode attention's launch settings alone and in the whole model at depth 16384, Nsight
# Compute on the default split kernel. Usage, repo root, .whl carried: OUT=... bash bench/attn_launch_session.sh
# 1. make_gguf Q4_K_M (seed 0) of FILES in the background;
# 2. bench/read_ceiling.py --no-reads: ALONE lines "shapes|splits|launches" (read_ceiling.py's names and
#    --launches format; splits: KILN_ATTN_SPLITS, 0 the default rule), one token against 16384 keys, 12 layers in
#    one CUDA graph -> alone.jsonl;
# 3. NCU_SHAPES: ncu --set full on one launch of the default split kernel a shape (bench/attn_ncu.py) ->
#    ncu_<shape>.txt (details page), ncu_<shape>_raw.csv (every metric);
# 4. bench/decode_ab.py --depth 16384 a file: MODEL lines "file|splits|launches JSON" -> ab_<file>.json.
set -u
ROOT=$PWD
source bench/carry_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
(for f in ${FILES:-llama-3.2-1b qwen3-8b}; do
   python bench/make_gguf.py --model $f --type Q4_K_M --out /tmp/g > /dev/null 2>&1
 done; touch /tmp/g/done) &
while IFS='|' read -r shapes splits launches; do
  [ -z "$shapes" ] && continue
  KILN_ATTN_SPLITS=${splits#0} timeout 120 python bench/read_ceiling.py --no-reads --layers 12 --shapes "$shapes" \
    --launches "$launches" | sed "s/^{/{\"splits\": \"$splits\", /" >> "$OUT/alone.jsonl" 2>&1
done <<< "${ALONE:-}"
cut -c1-100,180-400 "$OUT/alone.jsonl" 2>/dev/null
for s in ${NCU_SHAPES:-}; do
  timeout 150 ncu --set full --import-source no --clock-control none -k regex:_split_kernel --launch-skip 3 \
    --launch-count 1 -f -o /tmp/ncu_$s python bench/attn_ncu.py --shape $s > /tmp/ncu_$s.log 2>&1
  ncu -i /tmp/ncu_$s.ncu-rep --page details > "$OUT/ncu_$s.txt" 2>&1
  ncu -i /tmp/ncu_$s.ncu-rep --page raw --csv > "$OUT/ncu_${s}_raw.csv" 2>&1
done
while [ ! -f /tmp/g/done ]; do sleep 2; done
while IFS='|' read -r f splits launches; do
  [ -z "$f" ] && continue
  timeout ${AB_S:-150} python bench/decode_ab.py --model /tmp/g/$f-Q4_K_M.gguf --depth 16384 --splits "$splits" \
    --json "$OUT/ab_$f.json" --launches "$launches" 2>&1 | grep "^tg"
done <<< "${MODEL:-}"
