"""DenseSparseLinear and LowRankSparseLinear: exact against their dense reconstruction."""

import pytest
import torch

from compress.kernels import colsparse_to_dense
from compress.modules import MODULE_TYPES, DenseSparseLinear, LowRankSparseLinear


def _colsparse(k, n, s, gen):
    idx = torch.rand(k, n, generator=gen).argsort(0)[:s].sort(0).values
    return torch.randn(s, n, generator=gen), idx.to(torch.int16)


def test_dense_sparse_forward_is_d_times_s():
    gen = torch.Generator().manual_seed(0)
    m, n, k, s = 33, 47, 12, 5
    D, bias = torch.randn(m, k, generator=gen), torch.randn(m, generator=gen)
    values, indices = _colsparse(k, n, s, gen)
    layer = DenseSparseLinear.from_factors(D, values, indices, bias)
    S = colsparse_to_dense(values, indices, k)
    assert (S != 0).sum(0).eq(s).all()
    assert torch.equal(layer.sparse, S)
    x = torch.randn(3, 7, n, generator=gen)
    dense = x @ (D @ S).T + bias
    assert torch.allclose(layer(x), dense, atol=1e-5, rtol=1e-5)
    assert torch.allclose(layer.weight, D @ S)
    assert layer.indices.dtype == torch.int16 and not layer.indices.requires_grad
    assert layer.stored_params == m * k + s * n + m and layer.index_bytes == 2 * s * n
    assert {name for name, _ in layer.named_parameters()} == {"D", "values", "bias"}
    assert "indices" in dict(layer.named_buffers())
    assert MODULE_TYPES["dense_sparse"] is DenseSparseLinear


def test_dense_sparse_gradients_reach_d_and_values():
    gen = torch.Generator().manual_seed(1)
    values, indices = _colsparse(8, 20, 3, gen)
    layer = DenseSparseLinear.from_factors(torch.randn(10, 8, generator=gen), values, indices)
    layer(torch.randn(4, 20, generator=gen)).square().sum().backward()
    assert layer.D.grad.abs().sum() > 0 and layer.values.grad.abs().sum() > 0


def test_two_four_pattern_is_a_special_case():
    gen = torch.Generator().manual_seed(2)
    D, S = torch.randn(9, 16, generator=gen), torch.randn(16, 11, generator=gen)
    layer = DenseSparseLinear.from_dense_factors(D, S, 8, pattern="2:4")
    kept = (layer.sparse != 0).reshape(4, 4, 11).sum(1)
    assert layer.s == 8 and kept.eq(2).all()
    x = torch.randn(5, 11, generator=gen)
    assert torch.allclose(layer(x), x @ layer.weight.T, atol=1e-5)
    assert layer.spec()["pattern"] == "2:4"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0, s=1), "k=0"),
        (dict(k=4, s=5), "s=5"),
        (dict(k=6, s=3, pattern="2:4"), "2:4"),
        (dict(k=4, s=2, pattern="3:8"), "pattern"),
    ],
)
def test_dense_sparse_rejects_bad_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenseSparseLinear(10, 10, **kwargs)


def test_lowrank_sparse_forward_is_uv_plus_channels():
    gen = torch.Generator().manual_seed(3)
    m, n, r = 21, 30, 4
    U, V, bias = torch.randn(m, r, generator=gen), torch.randn(r, n, generator=gen), torch.randn(m, generator=gen)
    channels = torch.tensor([17, 2, 9])  # unsorted on purpose: stored ascending
    sc = torch.randn(m, 3, generator=gen)
    layer = LowRankSparseLinear.from_factors(U, V, sc, channels, bias)
    assert layer.sc_channels.tolist() == [2, 9, 17] and layer.sc_channels.dtype == torch.int32
    dense = U @ V
    dense[:, channels] += sc
    assert torch.allclose(layer.weight, dense, atol=1e-6)
    x = torch.randn(2, 5, n, generator=gen)
    assert torch.allclose(layer(x), x @ dense.T + bias, atol=1e-5)
    assert layer.stored_params == r * (m + n) + 3 * m + m and layer.index_bytes == 12
    assert MODULE_TYPES["lowrank_sparse"] is LowRankSparseLinear


def test_lowrank_sparse_without_channels_is_plain_lowrank():
    gen = torch.Generator().manual_seed(4)
    U, V = torch.randn(6, 2, generator=gen), torch.randn(2, 9, generator=gen)
    layer = LowRankSparseLinear.from_factors(U, V, torch.zeros(6, 0), torch.zeros(0, dtype=torch.long))
    x = torch.randn(3, 9, generator=gen)
    assert torch.allclose(layer(x), x @ (U @ V).T, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        LowRankSparseLinear(9, 6, 0, 1)
