#!/usr/bin/env bash
# Sets up (or updates) .venv with the [test] extra and runs the test suite.
# torch is pinned and installed first so pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv test
exec .venv/bin/python -m pytest "$@"
