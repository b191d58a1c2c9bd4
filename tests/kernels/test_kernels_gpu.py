"""The compiled kernels on a real GPU. This process runs Triton in interpreter mode (see conftest.py),
so the GPU checks run in a fresh subprocess without TRITON_INTERPRET."""

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU; the same kernels are checked on CPU under TRITON_INTERPRET=1 by the other tests",
)

GPU_SUITE = """
import sys, torch
import compress.kernels as K
from compress.kernels import testing as T
x = torch.randn(3, 8, device='cuda'); A = torch.randn(4, 2, device='cuda'); B = torch.randn(2, 8, device='cuda')
K.lowrank_linear(x, A, B)
assert K.dispatch_counts[('lowrank_linear', 'reference')] == 1, 'auto dispatch did not pick the reference on CUDA'
results = T.run_suite(T.CASES, (torch.float32, torch.bfloat16), device='cuda', backend='triton')
results += T.run_suite(T.GPU_CASES, (torch.bfloat16,), device='cuda', backend='triton')
print(T.table(results))
failures = T.report(results)
if failures:
    print(failures)
    sys.exit(1)
"""


def test_compiled_kernels_match_reference_on_gpu():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COMPRESS_KERNELS")}
    proc = subprocess.run([sys.executable, "-c", GPU_SUITE], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
