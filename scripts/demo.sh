#!/usr/bin/env bash
# The main job on an embedded default: build a small random GLM-4 in the original Hugging Face
# layout (real vocabulary, the 1M model's head layout), convert it to a glm-jax folder, check
# parity against the PyTorch reference, and print the figures. Sets up .venv on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv test            # parity needs torch and transformers
# Off a TPU VM, keep JAX from starting an installed libtpu (test.sh installs it for TPU compiles):
# glm-jax makes that choice for itself (glm_jax/cli.py); the same choice here serves the other steps.
export JAX_PLATFORMS="${JAX_PLATFORMS-$(.venv/bin/python -c 'from glm_jax.cli import default_platforms as p; print(p() or "")')}"
work="${DEMO_DIR:-$(mktemp -d)}"
echo "== 1/4 a random GLM-4 (4 layers, hidden 256, vocab 151,552) in the chatglm layout: $work/hf"
.venv/bin/python scripts/make_random_checkpoint.py --preset demo --out "$work/hf" --force
ref="${GLM_JAX_REFERENCE:-tests/data}"   # the real vocabulary, chat template and sampling defaults
cp "$ref/tokenizer.model" "$ref/models/glm-4-9b-chat-1m/tokenizer_config.json" \
   "$ref/models/glm-4-9b-chat-1m/generation_config.json" "$work/hf/"
echo "== 2/4 convert to a glm-jax model folder: $work/model"
.venv/bin/glm-jax convert "$work/hf" "$work/model" --force
echo "== 3/4 parity against PyTorch, float32 and bfloat16"
.venv/bin/glm-jax parity "$work/hf" --model "$work/model" --seq-len 100
.venv/bin/glm-jax parity "$work/hf" --dtype bfloat16 --seq-len 100
echo "== 4/4 generate (random weights, so the text is noise; the point is the compiled sampler)"
.venv/bin/glm-jax generate --model "$work/model" --chat --prompt "你好，请介绍一下你自己" --max-new-tokens 32 --temperature 0
.venv/bin/glm-jax generate --model "$work/model" --prompt "The capital of France is" --max-new-tokens 16 --json
