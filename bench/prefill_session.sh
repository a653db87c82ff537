#!/usr/bin/env bash
# One device call: random-weight Q4_K_M files of three real configs, then bench/prefill_profile.py on them
# (wall vs kernel time at several prompt lengths, variants side by side, the host's functions at 512).
# Carried wheels in .whl/ (gguf and what it needs) are installed where the machine lacks them.
# Usage on the device machine, repo root:  MODELS="qwen3-0.6b llama-3.2-1b qwen3-8b" bash bench/prefill_session.sh
set -u
ROOT=$PWD; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/g /tmp/carry
for m in gguf:gguf yaml:pyyaml jinja2:jinja2 markupsafe:markupsafe tqdm:tqdm; do
  python -c "import ${m%%:*}" 2>/dev/null || python -m pip install -q --no-deps --target /tmp/carry .whl/${m##*:}-*.whl
done
export PYTHONPATH="/tmp/carry:$ROOT" PYTHONUNBUFFERED=1
START=$(date +%s)
MODELS=${MODELS:-"qwen3-0.6b llama-3.2-1b qwen3-8b"}; TYPE=${TYPE:-Q4_K_M}
for m in $MODELS; do
  timeout 150 python bench/make_gguf.py --model "$m" --type "$TYPE" --out /tmp/g > /dev/null 2>"$OUT/make_$m.err" || echo "make_gguf $m failed"
done
echo "files made at $(( $(date +%s) - START )) s"; ls -la /tmp/g
for m in $MODELS; do
  timeout ${PROFILE_S:-200} python bench/prefill_profile.py --model "/tmp/g/$m-$TYPE.gguf" -p "${LENGTHS:-128,512,4096}" \
    -n 20 --cprofile 512 --variants "${VARIANTS:-base,mask,graph}" --json "$OUT/pp_$m.json" 2>&1 | grep -v Warning | tail -20
  echo "== $m rc=$? at $(( $(date +%s) - START )) s"
done
