#!/usr/bin/env bash
# Install (if needed), then compress the bundled SmolLM2-135M with WeLore (30 %) and evaluate it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/compress run recipes/welore-30.yaml smollm2-135m --out runs/smollm2-welore-30 "$@"
