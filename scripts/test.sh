#!/usr/bin/env bash
# Install (if needed), lint, and run the whole test suite, Triton kernels included (interpreted on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"
