#!/usr/bin/env bash
# Issue 14's side by side with mlx-lm's LoRA on CPU: the real Qwen2.5-Coder-0.5B converted to a float32
# Hugging Face folder (`kiln convert`: mlx-lm cannot read GGUF), then the same data (tests/data/finetune),
# iterations, batch, rank 8 with scale alpha/r = 2 on every projection of every block, learning rate,
# prompt masking and validation batches in `mlx_lm lora` and `kiln finetune`. Prints each tool's last lines
# (validation losses, training tokens/s). Usage: ITERS=25 bash bench/finetune_vs_mlx.sh > log
set -u
ITERS=${ITERS:-25}; DIR=${DIR:-/tmp/ftcmp}; mkdir -p "$DIR"
[ -f "$DIR/hf/config.json" ] || kiln convert qwen2.5-coder-0.5b "$DIR/hf" > /dev/null
cat > "$DIR/mlx.yaml" <<YAML
lora_parameters:
  rank: 8
  scale: 2.0
  dropout: 0.0
YAML
echo "== mlx-lm $(python -c 'import mlx_lm; print(mlx_lm.__version__)')"
/usr/bin/time -f "mlx wall %e s, max RSS %M KB" python -m mlx_lm lora --model "$DIR/hf" --train \
  --data tests/data/finetune --iters "$ITERS" --batch-size 4 --num-layers -1 --learning-rate 2e-4 \
  --mask-prompt --val-batches -1 --steps-per-report 5 --steps-per-eval "$ITERS" --adapter-path "$DIR/mlx-ad" \
  -c "$DIR/mlx.yaml" 2>&1 | grep -v "^\s*$" | tail -12
echo "== kiln"
/usr/bin/time -f "kiln wall %e s, max RSS %M KB" kiln finetune --model "$DIR/hf" --data tests/data/finetune \
  --iters "$ITERS" --batch-size 4 --lora-rank 8 --lora-alpha 16 --learning-rate 2e-4 --mask-prompt \
  --val-batches -1 --steps-per-eval "$ITERS" --adapter-path "$DIR/kiln-ad" 2>&1 | tr '\r' '\n' | grep -v "^\s*$" | grep -v "it/s\]$" | tail -12
