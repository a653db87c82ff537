#!/usr/bin/env bash
# One device call for issue 11's decode at depth, through gpu_session.sh (which builds llama.cpp in the
# background, or finds the build of an earlier call on the same machine): the split decode-attention
# kernel's launch settings timed at 16384 and 4096 keys (bench/attn_sweep.py), the fastest setting per shape
# against the default in whole-model decode after a 16384-token context (bench/decode_ab.py), then
# `kiln bench -p 512 -d 16384 --compare llama.cpp` on each file with that setting in force.
# Output under $OUT: attn_sweep.jsonl, depth_MODEL.json, bench_depth.jsonl, session.log.
# Usage on the device, repo root, .whl/ carried: bash bench/depth_session.sh
export STEPS="none" FILES="qwen3-0.6b:Q4_K_M llama-3.2-1b:Q4_K_M qwen3-8b:Q4_K_M" MAKE_S=240
export PRE_CMD='
timeout 150 python bench/attn_sweep.py --budget 130 > "$OUT/attn_sweep.jsonl" 2>/tmp/sweep.err
echo "== sweep rc=$? at $(( $(date +%s) - START )) s"; tail -3 /tmp/sweep.err; tail -1 "$OUT/attn_sweep.jsonl"
python - "$OUT/attn_sweep.jsonl" <<"EOF"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{\"shape")]
for shape in {r["shape"] for r in rows}:
    ok = [r for r in rows if r["shape"] == shape and r["depth"] == 16384 and r.get("max_err", 1) < 2e-2]
    best = min(ok, key=lambda r: r["us"])["launch"] if ok else {}
    json.dump(best, open(f"/tmp/launch_{shape}.json", "w")); print(shape, best)
EOF
for m in qwen3-8b llama-3.2-1b qwen3-0.6b; do
  L=$(cat /tmp/launch_$m.json 2>/dev/null || echo "{}")
  timeout 90 python bench/decode_ab.py --model /tmp/g/$m-Q4_K_M.gguf --depth 16384 --launches "[{}, $L]" \
    --json "$OUT/depth_$m.json" 2>&1 | grep -v "^ " | tail -4
  echo "== depth $m rc=$? at $(( $(date +%s) - START )) s"
done
while [ "$LLPID" != 0 ] && kill -0 $LLPID 2>/dev/null && [ "$(left)" -gt 150 ]; do sleep 5; done; cat /tmp/llinstall.log
CMP=""; llama_ready && CMP="--compare llama.cpp"
for m in qwen3-8b llama-3.2-1b qwen3-0.6b; do
  [ "$(left)" -lt 50 ] && { echo "out of time before $m"; break; }
  timeout $(( $(left) - 10 )) python - /tmp/launch_$m.json bench --model /tmp/g/$m-Q4_K_M.gguf -p 512 -d 16384 \
    -g 128 -r 3 --json $CMP > /tmp/b.json 2>/tmp/b.err <<"EOF"
import json, sys
from kiln.ops import attention
try:
    attention._LAUNCH = attention.Launch(**json.load(open(sys.argv[1])))
except OSError:
    pass
from kiln.cli import main
sys.exit(main(sys.argv[2:]))
EOF
  echo "== bench $m rc=$? at $(( $(date +%s) - START )) s"; tail -c 300 /tmp/b.err
  python -c "import json; d=json.load(open(\"/tmp/b.json\")); d[\"launch\"]=json.load(open(\"/tmp/launch_$m.json\")); print(json.dumps(d))" \
    | tee -a "$OUT/bench_depth.jsonl" | cut -c 1-1500
done'
bash bench/gpu_session.sh 2>&1 | tee "${OUT:-/tmp/out}/session.log"
