"""The dense_sparse_linear Triton kernel (under TRITON_INTERPRET=1) against the float64 reference:
forward and the gradient of every float input, NaN-poisoned outputs, verbose reports."""

import pytest

from compress.kernels.testing import CASES, DTYPES, check, dtype_id, report

OP = "dense_sparse_linear"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES[OP], ids=lambda c: c.name)
def test_triton_matches_reference(case, dtype, interpreted):
    results = check(OP, case, dtype, backend="triton")
    assert {r.tensor for r in results} >= {"y"} and len(results) > 2
    failures = report(results)
    assert not failures, "\n" + failures
