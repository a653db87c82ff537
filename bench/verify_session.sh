#!/usr/bin/env bash
# One device call that checks a merge on the GPU, kiln alone (no llama.cpp build): the GPU test files (one
# process each, in parallel), bench/gpu_engine_check.py, `kiln bench` of the old commit (.ab/old, a `git archive`)
# and this checkout alternately on make_gguf files (speed within noise), then bench/split_check.py on an
# 8B-shape Q4_K_M under a GPU budget. Output under $OUT: gpu_tests_*.log, engine_check.log, ab.jsonl,
# split_check.json. Usage (repo root, .whl/ and .ab/ carried): OUT=dir [ROUNDS="1 2"] bash bench/verify_session.sh
set -u
ROOT=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
. bench/carry_env.sh
START=$(date +%s); at() { echo "== $1 at $(( $(date +%s) - START )) s"; }
for f in ${FILES:-qwen3-0.6b llama-3.2-1b}; do
  timeout 120 python bench/make_gguf.py --model "$f" --type Q4_K_M --out /tmp/g > /dev/null 2>&1 || echo "make $f failed"
done
(timeout 200 python bench/make_gguf.py --model ${SPLIT_MODEL:-qwen3-8b} --type Q4_K_M --out /tmp/g > /dev/null 2>&1) &
MK=$!
at "files"
for t in ${TESTS:-test_quant_kernels test_fuse test_ops test_models}; do
  timeout "${TESTS_S:-200}" python -m pytest -q -p no:cacheprovider "tests/$t.py" > "$OUT/gpu_tests_$t.log" 2>&1 &
done
timeout 200 python bench/gpu_engine_check.py > "$OUT/engine_check.log" 2>&1
tail -14 "$OUT/engine_check.log"
wait $(jobs -p | grep -v "^$MK\$") 2>/dev/null
for t in ${TESTS:-test_quant_kernels test_fuse test_ops test_models}; do echo "$t: $(tail -1 "$OUT/gpu_tests_$t.log")"; done
at "tests"
for round in ${ROUNDS:-1 2}; do
  for f in ${FILES:-qwen3-0.6b llama-3.2-1b}; do
    for side in old new; do
      dir=$ROOT; [ $side = old ] && dir=$ROOT/.ab/old
      (cd "$dir" && PYTHONPATH="/tmp/carry:$dir" timeout 120 python -m kiln.cli bench --model "/tmp/g/$f-Q4_K_M.gguf" \
        -p 512 -g 128 -r 3 --json 2>/dev/null) > /tmp/b.json
      python - "$side" "$round" "$f" <<'PY' >> "$OUT/ab.jsonl"
import json, sys
try:
    d = json.load(open("/tmp/b.json"))
except Exception as e:
    print(json.dumps({"side": sys.argv[1], "round": sys.argv[2], "file": sys.argv[3], "error": str(e)})); raise SystemExit
k = d["kiln"]
print(json.dumps({"side": sys.argv[1], "round": int(sys.argv[2]), "file": sys.argv[3], "pp512": k["prefill_tok_s"],
                  "tg": k["decode_tok_s"], "user": k.get("decode_user_tok_s"), "load_s": k.get("load_s")}))
PY
      tail -1 "$OUT/ab.jsonl"
    done
  done
done
at "bench"
wait $MK
timeout 240 python bench/split_check.py /tmp/g/${SPLIT_MODEL:-qwen3-8b}-Q4_K_M.gguf --gpu-memory ${SPLIT_BUDGET:-3G} \
  > "$OUT/split_check.json" 2> /tmp/split.err
cat "$OUT/split_check.json"; tail -5 /tmp/split.err
at "split"
