#!/usr/bin/env bash
# The main job on an embedded default: build a small random GLM-4 in the original Hugging Face
# layout (real vocabulary, the 1M model's head layout), convert it to a glm-jax folder, check
# parity against the PyTorch reference, and print the figures. Sets up .venv on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv test            # parity needs torch and transformers
work="${DEMO_DIR:-$(mktemp -d)}"
echo "== 1/3 a random GLM-4 (4 layers, hidden 256, vocab 151,552) in the chatglm layout: $work/hf"
.venv/bin/python scripts/make_random_checkpoint.py --preset demo --out "$work/hf" --force
echo "== 2/3 convert to a glm-jax model folder: $work/model"
.venv/bin/glm-jax convert "$work/hf" "$work/model" --force
echo "== 3/3 parity against PyTorch, float32 and bfloat16"
.venv/bin/glm-jax parity "$work/hf" --model "$work/model" --seq-len 100
.venv/bin/glm-jax parity "$work/hf" --dtype bfloat16 --seq-len 100
