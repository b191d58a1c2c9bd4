"""Run from the source checkout (`python -m compress`, `python -c`, torchrun -m), the repository root is on
sys.path and its `kernels/` folder would shadow Hugging Face's `kernels` package, which transformers >= 5.25
depends on and imports at start-up. The folder must hand that name over to the real package."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import kernels, transformers.modeling_utils
import compress.kernels as ours
print(kernels.__file__)
print(ours.__file__, callable(ours.lowrank_linear))
"""


def _hub_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_transformers_imports_from_the_checkout_root():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    top_level, ours = proc.stdout.split("\n")[:2]
    our_init = ROOT / "kernels" / "__init__.py"
    assert ours == f"{our_init} True"
    if _hub_kernels_installed():
        assert Path(top_level) != our_init, "`kernels` resolved to the checkout's folder"


def test_cli_module_runs_from_the_checkout_root():
    proc = subprocess.run(
        [sys.executable, "-m", "compress", "validate", "lowrank-20"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok: lowrank-20" in proc.stdout
