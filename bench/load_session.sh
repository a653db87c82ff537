#!/usr/bin/env bash
# One device call for issue 11's cold start: `import torch` on this machine (before anything else loads
# its CPUs), then, through gpu_session.sh (which builds llama.cpp in the background for a later call), the
# random-weight files, the focused decode-attention sweep at 16384 keys (GPU only, while the build runs),
# and once the build is done: `kiln.load` old vs new (bench/load_ab.py, alternating; the old side a `git
# archive` in .ab/old), a cProfile'd load of the 8B, and cold `kiln generate --max-tokens 1` on the 1B.
# Output under $OUT: import_torch.txt, importtime_top.txt, attn_sweep_focus.jsonl, load_ab.jsonl,
# load_profile_8b.json, cold_generate.txt, session.log.
# Usage on the device, repo root, .whl/ and .ab/ carried: bash bench/load_session.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TIMEFORMAT="%R"
for i in 1 2 3; do { time python -c "import torch" ; } 2>> "$OUT/import_torch.txt"; done
python -X importtime -c "import torch" 2>&1 | sort -t'|' -k2 -n -r | head -25 > "$OUT/importtime_top.txt"
echo "import torch (s, three runs): $(tr '\n' ' ' < "$OUT/import_torch.txt")"
export STEPS="none" FILES="llama-3.2-1b:Q4_K_M qwen3-8b:Q4_K_M qwen3-0.6b:Q4_K_M" MAKE_S=240
export PRE_CMD='
timeout 100 python bench/attn_sweep.py --depths 16384 --focus --budget 85 > "$OUT/attn_sweep_focus.jsonl" 2>/tmp/sweep.err
echo "== sweep rc=$? at $(( $(date +%s) - START )) s"; tail -3 /tmp/sweep.err; tail -1 "$OUT/attn_sweep_focus.jsonl" | cut -c 1-1500
while [ "$LLPID" != 0 ] && kill -0 $LLPID 2>/dev/null && [ "$(left)" -gt 200 ]; do sleep 5; done; cat /tmp/llinstall.log
echo "== build waited at $(( $(date +%s) - START )) s"
for r in 1 2; do for m in llama-3.2-1b qwen3-8b; do for side in old new; do
  [ "$(left)" -lt 100 ] && break 3
  dir=$ROOT; [ $side = old ] && dir=$ROOT/.ab/old
  timeout 60 python bench/load_ab.py --root "$dir" --side $side /tmp/g/$m-Q4_K_M.gguf 2>/tmp/ab.err | tee -a "$OUT/load_ab.jsonl"
  tail -2 /tmp/ab.err
done; done; done
echo "== load A/B at $(( $(date +%s) - START )) s"
timeout 60 python bench/load_profile.py /tmp/g/qwen3-8b-Q4_K_M.gguf --out "$OUT/load_profile_8b.json" 2>&1 | head -60
echo "== profile at $(( $(date +%s) - START )) s"
for i in 1 2 3; do
  [ "$(left)" -lt 30 ] && break
  { time python -m kiln.cli generate --model /tmp/g/llama-3.2-1b-Q4_K_M.gguf --prompt hi --max-tokens 1 \
      --no-chat-template > /dev/null 2>/tmp/cold.err ; } 2>> "$OUT/cold_generate.txt"; tail -2 /tmp/cold.err
done
echo "cold generate (s): $(tr "\n" " " < "$OUT/cold_generate.txt")"
'
bash bench/gpu_session.sh 2>&1 | tee "$OUT/session.log"
