"""The harness itself: an output tile the kernel never writes must be reported, not pass by luck."""

import pytest
import torch

from compress.kernels.lowrank import triton_impl
from compress.kernels.testing import CASES, check, compare, report


class _DropLastTokenTile:
    """Launch the real kernel on a grid one token tile short."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return self.kernel[(max(1, grid[0] - 1),) + tuple(grid[1:])]


def test_unwritten_tile_is_reported(monkeypatch, interpreted):
    monkeypatch.setattr(triton_impl, "_lowrank_fwd_kernel", _DropLastTokenTile(triton_impl._lowrank_fwd_kernel))
    monkeypatch.setattr(triton_impl, "is_interpreted", lambda kernel: True)
    monkeypatch.setattr(triton_impl, "check_launchable", lambda *a: None)
    case = CASES["lowrank_linear"][0]  # 33 tokens = 2 tiles of 32
    results = check("lowrank_linear", case, torch.float32, backend="triton", backward=False)
    y = results[0]
    assert not y.ok and y.nonfinite == 63 and y.first_nonfinite == (32, 0), y.describe()
    assert "non-finite" in report(results)


def test_mismatch_report_is_verbose():
    ref = torch.zeros(4, 5, dtype=torch.float64)
    out = ref.clone()
    out[2, 3] = 1.0
    r = compare(out, ref + 1e-3, 1e-5, op="op", case="c", dtype="float32", backend="triton", tensor="y")
    text = r.describe()
    assert not r.ok and r.where == (2, 3)
    for piece in ("MISMATCH", "rel_err=", "max_abs_err=", "at (2, 3)", "got 1", "want 0.001"):
        assert piece in text, text


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_fails_even_when_norm_is_small(bad):
    ref = torch.ones(3, 3, dtype=torch.float64)
    out = ref.clone()
    out[1, 1] = bad
    r = compare(out, ref, 1e-5, op="op", case="c", dtype="float32", backend="triton", tensor="y")
    assert not r.ok and r.nonfinite == 1 and r.first_nonfinite == (1, 1)
