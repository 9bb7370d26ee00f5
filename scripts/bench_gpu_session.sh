#!/usr/bin/env bash
# One prepared GPU session (issue #15): bench_gpu.py with a kernel trace, then the 1K decode under
# XLA flag variants (command buffers with while loops and conditionals, command buffers off, no
# Triton GEMMs), each in its own process. The GPU image has jax, torch and transformers; this
# checkout goes on PYTHONPATH, and is installed in place (no dependencies, no download) when
# glm_jax.convert (the folder convert/) does not import yet.
#   scripts/bench_gpu_session.sh OUT_DIR [bench_gpu.py arguments...]
# OUT_DIR gets env.txt, bench-gpu.json, summary.txt, log.txt, prof/ and variant-NAME.{json,log}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/bench_gpu_session.sh OUT_DIR [bench_gpu.py arguments...]}
shift
mkdir -p "$out/prof"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import glm_jax.convert" 2>/dev/null ||
  python -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$out/install.txt" 2>&1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
  echo "XLA_FLAGS=${XLA_FLAGS:-}"
} > "$out/env.txt" 2>&1
timeout "${MAIN_TIMEOUT_S:-420}" python scripts/bench_gpu.py --profile "$out/prof" --out "$out/bench-gpu.json" "$@" \
  > "$out/summary.txt" 2> "$out/log.txt"
echo "exit $?" >> "$out/summary.txt"
base=${XLA_FLAGS:-}
while IFS='|' read -r name flags; do
  XLA_FLAGS="$base $flags" timeout "${VARIANT_TIMEOUT_S:-75}" python scripts/bench_gpu.py "$@" --sections "" \
    --out "$out/variant-$name.json" > "$out/variant-$name.log" 2>&1
  echo "$name exit $? ($flags)" >> "$out/summary.txt"
done <<'EOF'
cb_while|--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1
cb_off|--xla_gpu_enable_command_buffer=
no_triton_gemm|--xla_gpu_enable_triton_gemm=false
EOF
