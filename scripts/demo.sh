#!/usr/bin/env bash
# The main job on an embedded default: build a small random GLM-4 in the original Hugging Face
# layout (real vocabulary, the 1M model's head layout), convert it to a glm-jax folder, check
# parity against the PyTorch reference, and print the figures. Sets up .venv on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv test            # parity needs torch and transformers
# Off a TPU VM, keep JAX from starting an installed libtpu (test.sh installs it for TPU compiles):
# glm-jax makes that choice for itself (glm_jax/runtime.py); the same choice here serves the other steps.
export JAX_PLATFORMS="${JAX_PLATFORMS-$(.venv/bin/python -c 'from glm_jax.runtime import default_platforms as p; print(p() or "")')}"
work="${DEMO_DIR:-$(mktemp -d)}"
echo "== 1/5 a random GLM-4 (4 layers, hidden 256, vocab 151,552) in the chatglm layout: $work/hf"
.venv/bin/python scripts/make_random_checkpoint.py --preset demo --out "$work/hf" --force
ref="${GLM_JAX_REFERENCE:-tests/data}"   # the real vocabulary, chat template and sampling defaults
cp "$ref/tokenizer.model" "$ref/models/glm-4-9b-chat-1m/tokenizer_config.json" \
   "$ref/models/glm-4-9b-chat-1m/generation_config.json" "$work/hf/"
echo "== 2/5 convert to a glm-jax model folder: $work/model"
.venv/bin/glm-jax convert "$work/hf" "$work/model" --force
echo "== 3/5 parity against PyTorch, float32 and bfloat16 (forward and, in float32, every gradient)"
.venv/bin/glm-jax parity "$work/hf" --model "$work/model" --seq-len 100 --grad
.venv/bin/glm-jax parity "$work/hf" --dtype bfloat16 --seq-len 100
echo "== 4/5 generate (random weights, so the text is noise; the point is the compiled sampler)"
.venv/bin/glm-jax generate --model "$work/model" --chat --prompt "你好，请介绍一下你自己" --max-new-tokens 32 --temperature 0
.venv/bin/glm-jax generate --model "$work/model" --prompt "The capital of France is" --max-new-tokens 16 --json
echo "== 5/5 fine-tune: 6 LoRA steps on two chat examples, then the result generates"
printf '%s\n' '{"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}' \
  '{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}' \
  > "$work/chat.jsonl"
rm -rf "$work/tuned"
.venv/bin/glm-jax finetune --model "$work/model" --data "$work/chat.jsonl" --out "$work/tuned" --steps 6 \
  --batch-size 2 --seq-len 64 --lora-rank 4 --lr 1e-3 --quiet
tail -n 2 "$work/tuned/metrics.jsonl"
.venv/bin/glm-jax generate --model "$work/tuned" --chat --prompt "What is 2 + 2?" --max-new-tokens 8 --temperature 0
