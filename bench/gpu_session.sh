#!/usr/bin/env bash
# One device call (10 minutes at most): build llama.cpp's CUDA wheel in the background (or install one
# carried in .whl/), write the random-weight GGUFs, profile kiln on Qwen3-0.6B Q4_K_M, then run
# `kiln bench --compare llama.cpp` on each file while time is left. Steps are ordered by importance and
# each has its own limit. Usage on the device machine, repo root, with .whl/ carried (gguf, jinja2, pyyaml,
# markupsafe, tqdm, diskcache wheels for Python 3.12; llsrc.tar.gz, llama-cpp-python's sdist trimmed to the
# CUDA backend, or its built wheel in parts):
#   STEPS="profile compare" FILES="qwen3-0.6b:Q4_K_M llama-3.2-1b:Q4_K_M" bash bench/gpu_session.sh
# FILES NAME:llq-TYPE: llama.cpp's quantizer (bench/llama_quantize.py) makes TYPE from NAME-F16.gguf (list the
# F16 sources in LLQ_SRC; NO_LLAMA=1: no llama.cpp at all (kiln alone, no build), e.g. "qwen3-0.6b:F16").
# PRE_CMD: a command run right after the files are made (while llama.cpp builds). BENCH_ARGS: `kiln bench` options for every file (default -p 128,512 -g 128 -r 3); DEEP / DEEP_ARGS: files that
# also get long prompts and decode at depth.
# Output under $OUT: session.log, profile.json, bench.jsonl (one JSON per file). The CUDA wheel (~150 MB) is
# too large to carry back in, so each machine builds it once (~5 minutes on 16 cores); a second run of this
# script in the same call finds it. Files already in /tmp/g are kept.
set -u
ROOT=$PWD
mkdir -p /tmp/carry
for m in gguf:gguf yaml:pyyaml jinja2:jinja2 markupsafe:markupsafe tqdm:tqdm; do
  python -c "import ${m%%:*}" 2>/dev/null || python -m pip install -q --no-deps --target /tmp/carry .whl/${m##*:}-*.whl
done
export PYTHONPATH="/tmp/carry:$ROOT:/tmp/llsite" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g
STEPS=${STEPS:-"profile compare"}
FILES=${FILES:-"qwen3-0.6b:Q4_K_M llama-3.2-1b:Q4_K_M qwen3-0.6b:Q8_0 qwen3-0.6b:F16 llama-3.2-1b:Q8_0"}
START=$(date +%s); BUDGET=${BUDGET:-570}
left() { echo $((BUDGET - ($(date +%s) - START))); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

llama_ready() { python -c "import sys; sys.path.insert(0, '/tmp/llsite'); import llama_cpp" 2>/dev/null; }
install_llama() {  # a carried wheel (whole or in parts) or a build from the trimmed sdist
  if ls .whl/llama_cpp_python*.whl.part-* >/dev/null 2>&1; then
    cat .whl/llama_cpp_python*.whl.part-* > /tmp/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl
  fi
  local whl; whl=$(ls /tmp/llwheel/*.whl /tmp/llama_cpp_python*.whl .whl/llama_cpp_python*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ]; then
    python -m pip install -q --no-deps --target /tmp/llsite "$whl" .whl/diskcache*.whl && echo "llama.cpp: installed $whl"
    return
  fi
  (cd /tmp && tar xzf "$ROOT/.whl/llsrc.tar.gz" && \
   CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90-real -DLLAVA_BUILD=off" CMAKE_BUILD_PARALLEL_LEVEL=16 \
   python -m pip wheel -q --no-deps --no-build-isolation -w /tmp/llwheel /tmp/llama_cpp_python-0.3.36 > /tmp/llbuild.log 2>&1 && \
   python -m pip install -q --no-deps --target /tmp/llsite /tmp/llwheel/*.whl "$ROOT"/.whl/diskcache*.whl && \
   echo "llama.cpp: built in $(( $(date +%s) - START )) s") \
   || { echo "llama.cpp build failed"; tail -30 /tmp/llbuild.log; }
}
if llama_ready || [ -n "${NO_LLAMA:-}" ]; then echo "llama.cpp: installed or not wanted (NO_LLAMA)" > /tmp/llinstall.log; LLPID=0; else
  install_llama > /tmp/llinstall.log 2>&1 &
  LLPID=$!
fi

for f in $FILES ${LLQ_SRC:-}; do
  [[ "$f" == *llq-* ]] && continue  # made by llama.cpp's quantizer below
  [ -f "/tmp/g/${f%%:*}-${f##*:}.gguf" ] && continue
  timeout ${MAKE_S:-120} python bench/make_gguf.py --model "${f%%:*}" --type "${f##*:}" --out /tmp/g > /dev/null 2>&1 \
    || echo "make_gguf $f failed"
done
ls -la /tmp/g; echo "files made at $(( $(date +%s) - START )) s"

if [ -n "${PRE_CMD:-}" ]; then  # an experiment of the session's own, while llama.cpp builds
  eval "$PRE_CMD"; echo "== PRE_CMD rc=$? at $(( $(date +%s) - START )) s"
fi
if [[ " $STEPS " == *" engine "* ]]; then  # continuous batching: 1 vs 32 streams on the 1B shape
  timeout 150 python bench/engine_bench.py --model /tmp/g/llama-3.2-1b-Q4_K_M.gguf --streams 32 --tokens 64 \
    --prompt-len 64 --out "$OUT/engine_llama-3.2-1b-Q4_K_M.json" 2>&1 | tail -12
  echo "== engine rc=$? at $(( $(date +%s) - START )) s"
fi
if [[ " $STEPS " == *" int8 "* ]]; then  # int8-activation GEMV: GPU check, model A/B, in-graph sweep
  INT8_FILES=$(for f in $FILES; do printf "/tmp/g/%s-%s.gguf," "${f%%:*}" "${f##*:}"; done)
  timeout "${INT8_S:-420}" python bench/int8_ab.py --out "$OUT" --files "${INT8_FILES%,}" --budget "${INT8_BUDGET:-380}" \
    ${INT8_ARGS:-} 2>&1 | tail -60
  echo "== int8 rc=$? at $(( $(date +%s) - START )) s"
fi
if [[ " $STEPS " == *" pdl "* ]]; then  # programmatic dependent launch off / on, same process per file
  PDL_FILES=$(for f in $FILES; do printf "/tmp/g/%s-%s.gguf " "${f%%:*}" "${f##*:}"; done)
  timeout "${PDL_S:-240}" python bench/pdl_ab.py $PDL_FILES 2>/tmp/pdl.err | tee "$OUT/pdl_ab.jsonl"
  echo "== pdl rc=$? at $(( $(date +%s) - START )) s"; tail -5 /tmp/pdl.err
fi
if [[ " $STEPS " == *" tests "* ]]; then  # the kernel test files on the GPU, one process each (Triton compiles)
  for t in ${TESTS:-test_quant_kernels test_fuse test_ops}; do
    timeout "${TESTS_S:-150}" python -m pytest -q -p no:cacheprovider "tests/$t.py" > "$OUT/gpu_tests_$t.log" 2>&1 &
  done
  wait
  for t in ${TESTS:-test_quant_kernels test_fuse test_ops}; do echo "$t: $(tail -1 "$OUT/gpu_tests_$t.log")"; done
  echo "== tests at $(( $(date +%s) - START )) s"
fi
if [[ " $STEPS " == *" profile "* ]]; then
  timeout "${PROFILE_S:-240}" python bench/gpu_profile.py --model /tmp/g/qwen3-0.6b-Q4_K_M.gguf \
    --out "$OUT/profile.json" ${PROFILE_ARGS:-}
  echo "== profile rc=$? at $(( $(date +%s) - START )) s"
fi
if [[ " $STEPS " == *" compare "* ]]; then
  while [ "$LLPID" != 0 ] && kill -0 $LLPID 2>/dev/null && [ "$(left)" -gt 150 ]; do sleep 5; done
  cat /tmp/llinstall.log
  for f in $FILES; do  # NAME:llq-TYPE: llama.cpp's quantizer makes TYPE from NAME-F16.gguf
    [[ "$f" == *llq-* ]] && [ ! -f "/tmp/g/${f%%:*}-${f##*:}.gguf" ] && llama_ready && \
      timeout 200 python bench/llama_quantize.py "/tmp/g/${f%%:*}-F16.gguf" "/tmp/g/${f%%:*}-${f##*:}.gguf" "${f##*llq-}"
  done
  CMP=""; llama_ready && CMP="--compare llama.cpp"
  for f in $FILES; do
    [ "$(left)" -lt 45 ] && { echo "out of time before $f"; break; }
    name="${f%%:*}-${f##*:}"
    ARGS=${BENCH_ARGS:-"-p 128,512 -g 128 -r 3"}
    [[ " ${DEEP:-} " == *" $f "* ]] && ARGS=${DEEP_ARGS:-"-p 128,512,4096,16384 -d 0,4096,16384 -g 128 -r 3"}
    timeout $(( $(left) - 10 )) python -m kiln.cli bench --model "/tmp/g/$name.gguf" $ARGS ${COLD---cold} --json $CMP \
      > /tmp/b.json 2> /tmp/b.err
    echo "== $name rc=$? at $(( $(date +%s) - START )) s"; tail -c 400 /tmp/b.err
    python -c "import json,sys; d=json.load(open('/tmp/b.json')); print(json.dumps(d))" >> "$OUT/bench.jsonl" 2>/dev/null
    python - <<'EOF'
import json
try:
    d = json.load(open("/tmp/b.json"))
except Exception as e:
    print("no result", e); raise SystemExit
k, l = d["kiln"], d.get("llama.cpp", {})
print(f"kiln pp {json.dumps({p: round(v) for p, v in k['prefill_tok_s'].items()})} first-prompt ms "
      f"{json.dumps({p: round(v, 1) for p, v in k['prefill_first_ms'].items()})} tg "
      f"{json.dumps({p: round(v, 1) for p, v in k['decode_tok_s'].items()})} user {k['decode_user_tok_s']:.1f} "
      f"eff {k['effective_tok_s']:.1f} ttft {k['ttft_ms']:.1f} ms load {k['load_s']:.2f} s cold {k.get('cold_generate_s', 0):.2f} s "
      f"roof {100*k['roofline_share']:.0f}% mem/file {d.get('memory_over_file', 0):.2f} capture {k['capture_s']:.1f}s")
if l:
    print(f"llama.cpp pp {json.dumps({p: round(v) for p, v in l['prefill_tok_s'].items()})} tg "
          f"{json.dumps({p: round(v, 1) for p, v in l['decode_tok_s'].items()})} load {l['load_s']:.2f} s first token "
          f"{l['first_token_s']:.2f} s; ratio {json.dumps(d['ratio'], default=str)} top1 {d['prompt_top1_agreement']:.3f}")
EOF
  done
fi
[ "$LLPID" != 0 ] && wait $LLPID 2>/dev/null; ls -la "$OUT"
