"""The factorisation maths: exact at full rank, optimal for its (weighted) error, parameter rules."""

import pytest
import torch

from compress.activations import token_counts
from compress.errors import CompressError
from compress.methods.ofa.factorize import (
    check_dim,
    dim_for_reduction,
    factorize_embedding,
    factorized_params,
    frequency_weights,
    relative_error,
)


def _table(vocab=300, width=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a decaying spectrum, like a trained embedding
    return (
        torch.randn(vocab, width, generator=g)
        @ torch.diag(torch.linspace(3, 0.1, width))
        @ torch.linalg.qr(torch.randn(width, width, generator=g))[0]
    )


@pytest.mark.parametrize("shape", [(300, 48), (20, 48)])  # tall (Gram D x D) and wide (Gram V x V)
def test_full_rank_reproduces_the_table(shape):
    E = _table(*shape)
    k = min(shape)
    weights = torch.rand(shape[0], generator=torch.Generator().manual_seed(1)) * 5 + 0.2
    for w in (None, weights):
        coords, primitives = factorize_embedding(E, k, w)
        assert coords.shape == (shape[0], k) and primitives.shape == (k, shape[1])
        torch.testing.assert_close(coords @ primitives, E.double(), rtol=0, atol=1e-12)


def test_plain_truncation_equals_the_svd_truncation():
    E = _table()
    k = 12
    coords, primitives = factorize_embedding(E, k)
    U, S, Vh = torch.linalg.svd(E.double(), full_matrices=False)
    torch.testing.assert_close(coords @ primitives, U[:, :k] @ torch.diag(S[:k]) @ Vh[:k], rtol=0, atol=1e-10)
    # primitives are V_k^T (orthonormal rows), coordinates U_k S_k: the rows' own scale
    torch.testing.assert_close(primitives @ primitives.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(coords, E.double() @ primitives.T, rtol=0, atol=1e-10)


def test_weighted_svd_wins_on_weighted_error_and_loses_on_plain_error():
    E = _table()
    counts = torch.zeros(300)
    counts[:30] = torch.arange(30, 0, -1).float() ** 2 * 10  # a few frequent tokens, most never seen
    w = frequency_weights(counts.double())
    plain = factorize_embedding(E, 8)
    weighted = factorize_embedding(E, 8, w)
    assert relative_error(E, *weighted, row_weights=w) < 0.9 * relative_error(E, *plain, row_weights=w)
    assert relative_error(E, *plain) < relative_error(E, *weighted)  # Eckart-Young: plain SVD is optimal unweighted


def test_relative_error_is_chunk_independent():
    E = _table()
    coords, primitives = factorize_embedding(E, 5)
    assert relative_error(E, coords, primitives, chunk=7) == pytest.approx(relative_error(E, coords, primitives))


def test_token_counts_and_weights():
    counts = token_counts(torch.tensor([[0, 1, 1], [4, 1, 0]]), 6)
    assert counts.tolist() == [2, 3, 0, 0, 1, 0]
    assert frequency_weights(counts)[2] == 1.0
    with pytest.raises(CompressError, match="outside"):
        token_counts(torch.tensor([[7]]), 6)


def test_dim_rules():
    V, D = 49152, 576
    k = dim_for_reduction(V, D, 0.5)
    assert 1 - factorized_params(V, D, k) / (V * D) >= 0.5 > 1 - factorized_params(V, D, k + 1) / (V * D)
    check_dim(V, D, 128)
    for bad in (0, 570):  # 570 * (V + D) > V * D: saves nothing
        with pytest.raises(CompressError, match="out of range"):
            check_dim(V, D, bad)


def test_logit_fit_beats_the_plain_fit_on_logit_error():
    """With anisotropic hidden states the whitened fit wins where it is measured (logits) and
    loses on the table's own error; with an identity covariance it is the plain fit."""
    g = torch.Generator().manual_seed(3)
    E = torch.randn(300, 24, generator=g, dtype=torch.float64)
    H = torch.randn(500, 24, generator=g, dtype=torch.float64) * torch.logspace(1, -2, 24, dtype=torch.float64)
    cov = H.T @ H / H.shape[0]
    plain = factorize_embedding(E, 6)
    logit = factorize_embedding(E, 6, column_cov=cov)

    def logit_error(c, p):
        return (H @ (E - c @ p).T).norm()

    assert logit_error(*logit) < 0.9 * logit_error(*plain)
    assert (E - logit[0] @ logit[1]).norm() > (E - plain[0] @ plain[1]).norm()
    same = factorize_embedding(E, 6, column_cov=torch.eye(24, dtype=torch.float64))
    torch.testing.assert_close(same[0] @ same[1], plain[0] @ plain[1])
