#!/usr/bin/env bash
# One device call for issue 12's split decode with its GPU blocks in a CUDA graph (split.DeviceGraphs) and
# issue 15's -tp 2 plan, through gpu_session.sh (llama.cpp's CUDA wheel builds in the background, or an
# earlier call's build on the same machine is found): while it builds, bench/tp_plan.py on Qwen3-8B Q4_K_M
# (the whole model's step, rank 0's share at -tp 2, NCCL on this GPU); then bench/split_check.py with a
# 3 GiB GPU budget against llama.cpp with the same GPU layers (graph and eager decode, stream_generate).
# Output under $OUT: tp_plan.json, split_check.json, session.log.
# Usage on the device, repo root, .whl/ carried: bash bench/graph_session.sh
export STEPS="none" FILES="qwen3-8b:Q4_K_M" MAKE_S=240 NO_LLAMA=${NO_LLAMA:-}
export PRE_CMD='
timeout 150 python bench/tp_plan.py /tmp/g/qwen3-8b-Q4_K_M.gguf > "$OUT/tp_plan.json" 2>/tmp/tp.err
echo "== tp_plan rc=$? at $(( $(date +%s) - START )) s"; tail -c 800 /tmp/tp.err; cat "$OUT/tp_plan.json"
while [ "$LLPID" != 0 ] && kill -0 $LLPID 2>/dev/null && [ "$(left)" -gt 200 ]; do sleep 5; done; cat /tmp/llinstall.log
CMP=""; llama_ready && CMP="--compare llama.cpp"
timeout $(( $(left) - 15 )) python bench/split_check.py /tmp/g/qwen3-8b-Q4_K_M.gguf --gpu-memory 3G $CMP \
  > "$OUT/split_check.json" 2> /tmp/split.err; echo "== split rc=$? at $(( $(date +%s) - START )) s"
tail -c 1500 /tmp/split.err; cat "$OUT/split_check.json"'
bash bench/gpu_session.sh 2>&1 | tee "${OUT:-/tmp/out}/session.log"
