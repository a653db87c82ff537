#!/usr/bin/env bash
# One device call for issue 12's split acceptance, through gpu_session.sh: while llama.cpp's CUDA wheel builds,
# the device CPU's vector extensions and the native CPU kernels' rates on it (bench/cpu_kernel_rates.py), then
# where a split decode step's time goes (bench/split_profile.py); once llama.cpp is built, bench/split_check.py
# on Qwen3-8B Q4_K_M with a 3 GiB GPU budget against llama.cpp with the same GPU layers (its own process).
# Output under $OUT: cpu.txt, kernel_rates.json, split_profile.txt, split_check.json, session.log.
# Usage on the device, repo root, .whl/ carried: bash bench/split_session.sh
export STEPS="none" FILES="qwen3-8b:Q4_K_M" MAKE_S=240 NO_LLAMA=${NO_LLAMA:-}
export PRE_CMD='
lscpu > "$OUT/cpu.txt"; grep -o "avx512[a-z_]*\|avx2\|avx_vnni" /proc/cpuinfo | sort -u | tr "\n" " "; echo
timeout 60 python bench/cpu_kernel_rates.py > "$OUT/kernel_rates.json" 2>/tmp/kr.err; cat "$OUT/kernel_rates.json"; tail -3 /tmp/kr.err
timeout 150 python bench/split_profile.py /tmp/g/qwen3-8b-Q4_K_M.gguf --threads 8,16 > "$OUT/split_profile.txt" 2>&1
echo "== profile rc=$? at $(( $(date +%s) - START )) s"; head -c 3000 "$OUT/split_profile.txt"
while [ "$LLPID" != 0 ] && kill -0 $LLPID 2>/dev/null && [ "$(left)" -gt 200 ]; do sleep 5; done; cat /tmp/llinstall.log
CMP=""; llama_ready && CMP="--compare llama.cpp"
timeout $(( $(left) - 15 )) python bench/split_check.py /tmp/g/qwen3-8b-Q4_K_M.gguf --gpu-memory 3G $CMP \
  > "$OUT/split_check.json" 2> /tmp/split.err; echo "== split rc=$? at $(( $(date +%s) - START )) s"
tail -c 600 /tmp/split.err; cat "$OUT/split_check.json"'
bash bench/gpu_session.sh 2>&1 | tee "${OUT:-/tmp/out}/session.log"
