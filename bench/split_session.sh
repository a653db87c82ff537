#!/usr/bin/env bash
# One device call for issue 12's split acceptance (and issue 11's user-facing decode figure), through
# gpu_session.sh: while llama.cpp's CUDA wheel builds, `kiln bench` on Qwen3-0.6B Q4_K_M (device decode vs
# decode as generate streams it); once it is built, bench/split_check.py on Qwen3-8B Q4_K_M with a 3 GiB GPU
# budget against llama.cpp with the same GPU layers (its own process). Output under $OUT: bench_0.6b.json,
# split_check.json, session.log. Usage on the device, repo root, .whl/ carried: bash bench/split_session.sh
export STEPS="none" FILES="qwen3-0.6b:Q4_K_M qwen3-8b:Q4_K_M" MAKE_S=240 NO_LLAMA=${NO_LLAMA:-}
export PRE_CMD='
timeout 150 python -m kiln.cli bench --model /tmp/g/qwen3-0.6b-Q4_K_M.gguf -p 512 -g 128 -r 5 --json \
  > "$OUT/bench_0.6b.json" 2> /tmp/b06.err; echo "== bench 0.6b rc=$? at $(( $(date +%s) - START )) s"; tail -c 300 /tmp/b06.err
while kill -0 $LLPID 2>/dev/null && [ "$(left)" -gt 200 ]; do sleep 5; done; cat /tmp/llinstall.log
CMP=""; llama_ready && CMP="--compare llama.cpp"
timeout $(( $(left) - 15 )) python bench/split_check.py /tmp/g/qwen3-8b-Q4_K_M.gguf --gpu-memory 3G $CMP \
  > "$OUT/split_check.json" 2> /tmp/split.err; echo "== split rc=$? at $(( $(date +%s) - START )) s"
tail -c 600 /tmp/split.err; cat "$OUT/split_check.json"'
bash bench/gpu_session.sh 2>&1 | tee "${OUT:-/tmp/out}/session.log"
