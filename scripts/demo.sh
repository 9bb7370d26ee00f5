#!/usr/bin/env bash
# The main job on an embedded default: build a small random GLM-4 in the original Hugging Face
# layout (real vocabulary, the 1M model's head layout), convert it to a glm-jax folder, check
# parity against the PyTorch reference, generate, fine-tune it to answer two questions; each step
# says what its output means. Sets up .venv on a fresh machine.
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
echo "== 3/5 parity against PyTorch, float32 and bfloat16 (forward and, in float32, every gradient):"
echo "   rel error = |glm-jax - PyTorch| / |PyTorch| per hidden state, logits and gradient; PASS within the tolerance"
.venv/bin/glm-jax parity "$work/hf" --model "$work/model" --seq-len 100 --grad
.venv/bin/glm-jax parity "$work/hf" --dtype bfloat16 --seq-len 100
echo "== 4/5 generate: the weights are random, so the text is noise (any tokens of the real vocabulary);"
echo "   what runs is the real path: chat template, prefill, the compiled sampler, streaming"
.venv/bin/glm-jax generate --model "$work/model" --chat --prompt "你好，请介绍一下你自己" --max-new-tokens 32 --temperature 0
echo "   the same as one JSON object (prompt length, new ids, text, whether a stop id ended it, seconds):"
.venv/bin/glm-jax generate --model "$work/model" --prompt "The capital of France is" --max-new-tokens 16 --json
echo "== 5/5 fine-tune: 30 LoRA steps (rank 4, lr 1e-2) on two chat examples, so that the random model learns"
echo "   to answer them: 'What is 2 + 2?' -> '4', 'Name a colour.' -> 'Blue.'"
printf '%s\n' '{"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}' \
  '{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}' \
  > "$work/chat.jsonl"
rm -rf "$work/tuned"
.venv/bin/glm-jax finetune --model "$work/model" --data "$work/chat.jsonl" --out "$work/tuned" --steps 30 \
  --batch-size 2 --seq-len 64 --lora-rank 4 --lr 1e-2 --quiet
.venv/bin/python - "$work/tuned/metrics.jsonl" <<'EOF'
import json, math, sys
first, *_, last = [json.loads(line) for line in open(sys.argv[1])]
print(f"   loss (cross-entropy of the answers, nats/token): step 1 {first['loss']:.2f} (a random model's: "
      f"ln 151552 = {math.log(151552):.2f}), step {last['step']} {last['loss']:.2f} (low enough for the answers "
      f"to be the most likely tokens, which greedy decoding picks)")
EOF
echo "   the answers (greedy, 8 tokens at most, line breaks shown as spaces) of the model before and after:"
answer() { .venv/bin/glm-jax generate --model "$1" --chat --prompt "$2" --max-new-tokens 8 --temperature 0 | tr '\n' ' '; }
for question in "What is 2 + 2?" "Name a colour."; do
  printf '   %-16s before: [%s]  after: [%s]\n' "$question" "$(answer "$work/model" "$question")" \
    "$(answer "$work/tuned" "$question")"
done
