# Sourced by the device scripts: the pure-Python wheels in .whl/ the GPU machine lacks, installed under
# /tmp/carry, and PYTHONPATH set to them and the checkout. Needs ROOT (the repository root).
mkdir -p /tmp/carry
for m in gguf:gguf yaml:pyyaml jinja2:jinja2 markupsafe:markupsafe tqdm:tqdm psutil:psutil accelerate:accelerate peft:peft; do
  python -c "import ${m%%:*}" 2>/dev/null || python -m pip install -q --no-deps --target /tmp/carry .whl/${m##*:}-*.whl
done
export PYTHONPATH="/tmp/carry:$ROOT" PYTHONUNBUFFERED=1
