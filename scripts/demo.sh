#!/usr/bin/env bash
# Install (if needed), then compress the bundled SmolLM2-135M by 20 % (recipes/lowrank-20.yaml) and evaluate it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/compress run recipes/lowrank-20.yaml smollm2-135m --out runs/smollm2-lowrank-20 "$@"
