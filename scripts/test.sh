#!/usr/bin/env bash
# Sets up (or updates) .venv with the [test] and [tpu] extras and runs the test suite.
# torch is pinned and installed first so pip never pulls a CUDA build; libtpu is only used to
# compile TPU programs ahead of time (nothing runs on a TPU).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv test,tpu
exec .venv/bin/python -m pytest "$@"
