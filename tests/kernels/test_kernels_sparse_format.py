"""kernels/sparse_format.py: the column-wise fixed-count sparse format and its helpers."""

import pytest
import torch

from compress.kernels.sparse_format import (
    check_colsparse,
    colsparse_to_dense,
    dense_to_colsparse,
    dense_to_nm_colsparse,
    storage_bytes,
)


def _sparse_with_s_per_column(k, n, s, seed=0):
    gen = torch.Generator().manual_seed(seed)
    S = torch.zeros(k, n)
    for j in range(n):
        rows = torch.randperm(k, generator=gen)[:s]
        S[rows, j] = torch.randn(s, generator=gen) + 3.0  # never zero
    return S


@pytest.mark.parametrize("k,n,s", [(17, 127, 3), (8, 5, 8), (20, 9, 1), (6, 4, 0)])
def test_round_trip_is_exact_when_columns_have_s_nonzeros(k, n, s):
    S = _sparse_with_s_per_column(k, n, s)
    values, indices = dense_to_colsparse(S, s)
    assert values.shape == indices.shape == (s, n)
    assert indices.dtype == torch.int16
    torch.testing.assert_close(colsparse_to_dense(values, indices, k), S, rtol=0, atol=0)


def test_keeps_the_s_largest_magnitudes_sorted_and_distinct():
    gen = torch.Generator().manual_seed(1)
    S = torch.randn(17, 40, generator=gen)
    values, indices = dense_to_colsparse(S, 5, index_dtype=torch.int32)
    assert indices.dtype == torch.int32
    idx = indices.long()
    assert (idx[1:] > idx[:-1]).all(), "indices must be strictly ascending (hence distinct) per column"
    torch.testing.assert_close(values, S.gather(0, idx), rtol=0, atol=0)
    kept = values.abs().min(0).values
    dropped = colsparse_to_dense(values, indices, 17).eq(0) * S.abs()
    assert (dropped.max(0).values <= kept).all()
    assert ((colsparse_to_dense(values, indices, 17) != 0).sum(0) == 5).all()


def test_two_four_pattern_is_a_special_case():
    gen = torch.Generator().manual_seed(2)
    S = torch.randn(16, 12, generator=gen)
    values, indices = dense_to_nm_colsparse(S, 2, 4)
    assert values.shape == (8, 12)
    dense = colsparse_to_dense(values, indices, 16)
    groups = dense.reshape(4, 4, 12)
    assert ((groups != 0).sum(1) == 2).all()
    # the kept two are the largest two of each group of four
    top2 = S.abs().reshape(4, 4, 12).topk(2, dim=1).values.sum(1)
    torch.testing.assert_close(groups.abs().sum(1), top2)
    # and the general helper recovers the same matrix from it
    v2, i2 = dense_to_colsparse(dense, 8)
    torch.testing.assert_close(colsparse_to_dense(v2, i2, 16), dense, rtol=0, atol=0)


def test_storage_bytes():
    values, indices = dense_to_colsparse(torch.randn(17, 127), 3)
    assert storage_bytes(values, indices) == 3 * 127 * (4 + 2)
    values, indices = dense_to_colsparse(torch.randn(17, 127, dtype=torch.bfloat16), 3, index_dtype=torch.int32)
    assert storage_bytes(values, indices) == 3 * 127 * (2 + 4)


def test_colsparse_to_dense_is_differentiable_in_values():
    values, indices = dense_to_colsparse(torch.randn(9, 7), 2)
    values.requires_grad_(True)
    weights = torch.randn(9, 7)
    (colsparse_to_dense(values, indices, 9) * weights).sum().backward()
    torch.testing.assert_close(values.grad, weights.gather(0, indices.long()))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="s=5"):
        dense_to_colsparse(torch.randn(4, 3), 5)
    with pytest.raises(ValueError, match="2-D"):
        dense_to_colsparse(torch.randn(4, 3, 2), 1)
    with pytest.raises(ValueError, match="divisible"):
        dense_to_nm_colsparse(torch.randn(6, 3), 2, 4)
    with pytest.raises(ValueError, match="int16"):
        dense_to_colsparse(torch.randn(40000, 1), 1, index_dtype=torch.int16)
    values, indices = dense_to_colsparse(torch.randn(4, 3), 2)
    with pytest.raises(TypeError, match="int16/int32/int64"):
        check_colsparse(values, indices.float(), 4)
    with pytest.raises(ValueError, match="must both be"):
        check_colsparse(values, indices[:1], 4)
    with pytest.raises(ValueError, match="exceeds k"):
        check_colsparse(values, indices, 1)
