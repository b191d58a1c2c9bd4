"""Dispatch rules, argument checks and the lean import of compress.kernels."""

import os
import subprocess
import sys

import pytest
import torch

import compress.kernels as K
from compress.kernels import dispatch_counts, testing

OPS = list(testing.OPS)


def _inputs(op, dtype=torch.float32):
    return testing.make_inputs(op, testing.CASES[op][0], dtype)


@pytest.mark.parametrize("op", OPS)
def test_cpu_defaults_to_the_reference(op):
    fn, ref = testing.OPS[op]
    args = _inputs(op)
    before = dict(dispatch_counts)
    y = fn(**args)
    assert dispatch_counts[(op, "reference")] == before.get((op, "reference"), 0) + 1
    assert dispatch_counts[(op, "triton")] == before.get((op, "triton"), 0)
    torch.testing.assert_close(y, ref(**args), rtol=0, atol=0)
    assert K.choose_backend(*[v for v in args.values() if isinstance(v, torch.Tensor)]) == "reference"


@pytest.mark.parametrize("op", OPS)
def test_env_forces_a_backend(op, monkeypatch, interpreted):
    fn, _ = testing.OPS[op]
    args = _inputs(op)
    for backend in ("reference", "triton"):
        monkeypatch.setenv("COMPRESS_KERNELS", backend)
        before = dispatch_counts[(op, backend)]
        fn(**args)
        assert dispatch_counts[(op, backend)] == before + 1


def test_bad_env_value_is_an_error(monkeypatch):
    monkeypatch.setenv("COMPRESS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="COMPRESS_KERNELS"):
        K.lowrank_linear(**_inputs("lowrank_linear"))


def test_reference_backend_trains_in_bf16():
    args = _inputs("lowrank_sparse_linear", torch.bfloat16)
    for name in ("x", "U", "V", "sc_values", "bias"):
        args[name].requires_grad_(True)
    y = K.lowrank_sparse_linear(**args)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert all(
        args[name].grad is not None and args[name].grad.dtype == torch.bfloat16
        for name in ("x", "U", "V", "sc_values", "bias")
    )


def test_argument_errors_name_the_problem():
    args = _inputs("lowrank_linear")
    with pytest.raises(ValueError, match="B must have shape"):
        K.lowrank_linear(args["x"], args["A"], args["B"][:, :-1])
    with pytest.raises(TypeError, match="A has dtype"):
        K.lowrank_linear(args["x"], args["A"].double(), args["B"])
    with pytest.raises(ValueError, match="bias must have shape"):
        K.lowrank_linear(args["x"], args["A"], args["B"], args["bias"][:-1])
    ds = _inputs("dense_sparse_linear")
    with pytest.raises(ValueError, match="D must have shape"):
        K.dense_sparse_linear(ds["x"], ds["D"], ds["values"], ds["indices"], ds["k"] + 1)
    ls = _inputs("lowrank_sparse_linear")
    with pytest.raises(TypeError, match="sc_channels must be int32 or int64"):
        K.lowrank_sparse_linear(ls["x"], ls["U"], ls["V"], ls["sc_values"], ls["sc_channels"].to(torch.int16))


def _run(code, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COMPRESS_KERNELS")}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


LEAN = """
import sys, torch
import compress.kernels as K
from compress.kernels import testing
assert 'triton' not in sys.modules, 'import compress.kernels imported triton'
for op, (fn, _) in testing.OPS.items():
    fn(**testing.make_inputs(op, testing.CASES[op][0], torch.float32))
assert 'triton' not in sys.modules, 'a CPU call imported triton'
print('lean ok')
"""


def test_import_does_not_import_triton():
    proc = _run(LEAN)
    assert proc.returncode == 0 and "lean ok" in proc.stdout, proc.stdout + proc.stderr


def test_forced_triton_on_cpu_without_interpreter_explains_itself():
    code = (
        "import torch, compress.kernels as K\n"
        "K.lowrank_linear(torch.randn(2, 8), torch.randn(4, 3), torch.randn(3, 8))\n"
    )
    proc = _run(code, COMPRESS_KERNELS="triton")
    assert proc.returncode != 0 and "TRITON_INTERPRET=1" in proc.stderr, proc.stderr[-2000:]
