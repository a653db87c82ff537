#!/usr/bin/env bash
# One device call: the CPU + GPU split (bench/split_check.py, Qwen3-8B Q4_K_M, 3 GiB GPU budget) against llama.cpp
# with the same GPU layers, the CPU blocks' compact weights in transparent huge pages (the default), then the split
# alone with KILN_HUGE_PAGES=0 / 1 alternating while time is left. Everything after llama.cpp's CUDA wheel is built:
# the build takes every core, and the split's CPU blocks would time the compiler.
# Output under $OUT: split_hp.jsonl (one split_check JSON a line, with "huge_pages"), session.log, cpu.txt.
# Usage on the device, repo root, .whl/ carried: bash bench/split_hp_session.sh
export STEPS="none" FILES="qwen3-8b:Q4_K_M" MAKE_S=240
export PRE_CMD='
lscpu > "$OUT/cpu.txt"; grep -m1 "model name" /proc/cpuinfo; cat /sys/kernel/mm/transparent_hugepage/enabled
run_hp() {  # $1: KILN_HUGE_PAGES, then split_check options
  hp=$1; shift
  KILN_HUGE_PAGES=$hp timeout $(( $(left) - 10 )) python bench/split_check.py /tmp/g/qwen3-8b-Q4_K_M.gguf \
    --gpu-memory 3G "$@" > /tmp/s.json 2> /tmp/split.err
  echo "== split hp=$hp $* rc=$? at $(( $(date +%s) - START )) s"; tail -c 300 /tmp/split.err
  python -c "import json; d=json.load(open(\"/tmp/s.json\")); d[\"huge_pages\"]=$hp; print(json.dumps(d))" \
    >> "$OUT/split_hp.jsonl" && tail -1 "$OUT/split_hp.jsonl" | cut -c1-700
}
while [ "$LLPID" != 0 ] && kill -0 $LLPID 2>/dev/null && [ "$(left)" -gt 150 ]; do sleep 5; done; cat /tmp/llinstall.log
llama_ready && run_hp 1 --compare llama.cpp
for hp in 0 1 0 1; do [ "$(left)" -gt 70 ] && run_hp $hp; done'
bash bench/gpu_session.sh 2>&1 | tee "${OUT:-/tmp/out}/session.log"
