set -u
export PYTHONPATH=/tmp/carry:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/carry /tmp/g
for m in gguf:gguf yaml:pyyaml jinja2:jinja2 markupsafe:markupsafe tqdm:tqdm; do
  python -c "import ${m%%:*}" 2>/dev/null || python -m pip install -q --no-deps --target /tmp/carry .whl/${m##*:}-*.whl
done
nvidia-smi --query-gpu=name --format=csv,noheader
(python bench/make_gguf.py --model qwen3-8b --type Q4_K_M --out /tmp/g > /dev/null 2>&1; echo "8b made") &
python bench/make_gguf.py --model qwen3-0.6b --type Q4_K_M --out /tmp/g > /dev/null 2>&1
timeout 150 python bench/attn_fixed.py > $OUT/attn_fixed.jsonl 2> $OUT/attn_fixed.err; echo "attn rc=$?"
wait
for f in qwen3-0.6b qwen3-8b; do
  for d in "0" "0,16384"; do
    timeout 120 python -m kiln.cli bench --model /tmp/g/$f-Q4_K_M.gguf -p 512 -g 128 -d $d -r 3 --json > /tmp/b.json 2>/dev/null
    python -c "import json; d=json.load(open('/tmp/b.json')); k=d['kiln']; print(json.dumps({'file': '$f', 'depths': '$d', 'tg': k['decode_tok_s'], 'kv': k.get('kv_cache')}))" | tee -a $OUT/tg_cache.jsonl
  done
done
