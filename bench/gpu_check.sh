#!/usr/bin/env bash
# One prepared device check for a lent CUDA GPU (written for an H200), run from anywhere:
#   bash bench/gpu_check.sh
# 1. the kernel tests: the interpreter suite plus the compiled-kernel GPU test (tests/kernels/test_kernels_gpu.py);
# 2. bench/kernel_checks.py --gpu: the same checks on the compiled kernels, then timings -> bench/results/kernels.md.
# Installs nothing heavy: torch (CUDA) + triton are expected; if torch is missing it tries the
# torch==2.13.0 wheel (the PyPI Linux wheel is the CUDA build and brings triton). Logs and the
# results file are copied to $OUT when it is set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
LOGS="${OUT:-bench/results}"
mkdir -p "$LOGS"

if ! "$PY" -c "import torch, triton" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true

# compress.kernels lives in kernels/ (package-dir mapping, see pyproject.toml): editable-install it
# (no dependencies), or failing that map it with a tiny import hook loaded through sitecustomize.
if ! "$PY" -c "import compress.kernels" 2>/dev/null; then
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . ; then
        SHIM="$(mktemp -d)"
        cat > "$SHIM/sitecustomize.py" <<PYEOF
import importlib.abc, importlib.util, sys
_MAP = {"compress.kernels": "$PWD/kernels", "compress.eval": "$PWD/eval"}
class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in _MAP:
            return importlib.util.spec_from_file_location(
                name, _MAP[name] + "/__init__.py", submodule_search_locations=[_MAP[name]])
        return None
sys.meta_path.insert(0, _Finder())
PYEOF
        export PYTHONPATH="$SHIM:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$PY" -c "import compress.kernels"
fi

status=0
if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest tests/kernels -q -p no:cacheprovider 2>&1 | tee "$LOGS/pytest_kernels.log" || status=1
else
    echo "pytest missing: skipping tests/kernels (bench/kernel_checks.py --gpu runs the same GPU checks)" | tee "$LOGS/pytest_kernels.log"
fi
env -u TRITON_INTERPRET "$PY" bench/kernel_checks.py --gpu 2>&1 | tee "$LOGS/bench_kernels.log" || status=1

if [ -n "${OUT:-}" ]; then
    cp bench/results/kernels.md "$OUT/kernels.md"
fi
exit "$status"
