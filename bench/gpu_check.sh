#!/usr/bin/env bash
# One prepared device check for a lent CUDA GPU (written for an H200), run from anywhere:
#   bash bench/gpu_check.sh
# 1. bench/scale.py --device cuda: the shipped lowrank-20's settings on the synthetic 3B and the Llama-2-7B-shaped
#    model, cut to their first SCALE_LAYERS layers (same shapes): seconds per layer, GPU and host memory
#    -> bench/results/scale.md. The first row doubles as the smoke test: if it fails, the others are skipped.
# 2. bench/kernel_checks.py --gpu: the interpreter suite's checks on the compiled kernels, then timings
#    -> bench/results/kernels.md (tests/kernels/test_kernels_gpu.py runs the same checks under pytest).
# 3. the whitening-only benchmark recipe on the 7B-shaped model, if time is left.
# Every step has its own time limit and the script stops starting steps past DEADLINE_S seconds, so one slow
# step cannot take the others' results with it. Logs and results are copied to $OUT (when set) after each step.
# SCALE=0 skips the scale rows (steps 1 and 3). For a machine without registry access: WHEELS=DIR installs the wheels in DIR first (into a private folder on
# PYTHONPATH), COMPRESS_CACHE=DIR holds the parsed calibration corpus, COMPRESS_SCALE_TOKENIZER=DIR SmolLM2's
# tokenizer (see bench/scale.py).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
LOGS="${OUT:-bench/results}"
DEADLINE_S="${DEADLINE_S:-500}"
SCALE_LAYERS="${SCALE_LAYERS:-3}"
THREADS="${THREADS:-$(nproc)}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$LOGS"
START=$SECONDS

if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import torch, triton" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true

# compress.kernels lives in kernels/ (package-dir mapping, see pyproject.toml): editable-install it
# (no dependencies), or failing that map it with a tiny import hook loaded through sitecustomize.
if ! "$PY" -c "import compress.kernels" 2>/dev/null; then
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . ; then
        SHIM="$(mktemp -d)"
        cat > "$SHIM/sitecustomize.py" <<PYEOF
import importlib.abc, importlib.util, sys
_MAP = {"compress.kernels": "$PWD/kernels", "compress.eval": "$PWD/eval", "compress.bundled_recipes": "$PWD/recipes"}
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
    "$PY" -c "import compress.kernels" || exit 1
fi

status=0
collect() {
    if [ -n "${OUT:-}" ]; then
        cp bench/results/scale.json bench/results/scale.md bench/results/kernels.md "$OUT/" 2>/dev/null || true
    fi
}
time_left() { echo $((DEADLINE_S - (SECONDS - START))); }
scale_row() {  # MODEL RECIPE LIMIT_S
    local left; left=$(time_left)
    if [ "$left" -lt 60 ]; then echo "skipped $1 $2: ${left} s left" | tee -a "$LOGS/scale.log"; return 1; fi
    echo "== $1 $2 (limit $(( $3 < left ? $3 : left )) s)" | tee -a "$LOGS/scale.log"
    timeout $(( $3 < left ? $3 : left )) "$PY" bench/scale.py "$1" --device cuda --recipe "$2" --paths streamed \
        --threads "$THREADS" 2>&1 | tee -a "$LOGS/scale.log"
    local rc=$?
    collect
    return $rc
}

if [ "${SCALE:-1}" = 1 ]; then
    if scale_row "synthetic-3b-${SCALE_LAYERS}l" lowrank-20 200; then
        scale_row "synthetic-7b-${SCALE_LAYERS}l" lowrank-20 240 || status=1
    else
        status=1
    fi
fi
left=$(time_left)
if [ "$left" -gt 60 ]; then
    env -u TRITON_INTERPRET timeout "$left" "$PY" bench/kernel_checks.py --gpu 2>&1 | tee "$LOGS/bench_kernels.log" || status=1
fi
collect
if [ "$status" -eq 0 ] && [ "${SCALE:-1}" = 1 ]; then
    scale_row "synthetic-7b-${SCALE_LAYERS}l" whiten-20 200 || true
fi
echo "gpu_check: status $status after $((SECONDS - START)) s"
exit "$status"
