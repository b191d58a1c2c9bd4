import math

import pytest
import torch

from compress.lowrank_math import (
    allocate_ranks,
    asvd_factors,
    breakeven_rank,
    damped_cholesky,
    output_error,
    refine_factors,
    truncated_svd_factors,
    truncation_error_profile,
    whitened_factors,
)


def _data(m=24, n=16, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    X = mix @ torch.randn(n, tokens, generator=g, dtype=torch.float64)
    return W, X


def test_whitening_full_rank_reconstructs_W_and_WS_exactly():
    W, X = _data()
    C = X @ X.T
    A, B = whitened_factors(W, C, rank=16)
    assert torch.allclose(A @ B, W, atol=1e-8)
    L, eps = damped_cholesky(C)
    assert eps == 0.0
    assert torch.allclose(A @ B @ L, W @ L, atol=1e-8)


def test_whitening_is_optimal_on_its_objective():
    W, X = _data()
    C = X @ X.T
    for k in (2, 5, 9):
        A, B = whitened_factors(W, C, k)
        A0, B0 = truncated_svd_factors(W, k)
        assert output_error(W, A, B, C) <= output_error(W, A0, B0, C) + 1e-9
        # SVD-LLM: the error equals the sum of the discarded squared singular values of W S
        s = torch.linalg.svdvals(W @ damped_cholesky(C)[0])
        assert math.isclose(output_error(W, A, B, C), float((s[k:] ** 2).sum()), rel_tol=1e-6)


@pytest.mark.parametrize("kind", ["rank_deficient", "zeros", "huge"])
def test_damping_keeps_factors_finite(kind):
    W, X = _data(n=16, tokens=5)  # 5 tokens: covariance of rank 5 < 16
    C = {"rank_deficient": X @ X.T, "zeros": torch.zeros(16, 16, dtype=torch.float64), "huge": 1e12 * (X @ X.T)}[kind]
    L, eps = damped_cholesky(C)
    assert torch.isfinite(L).all() and eps > 0
    A, B = whitened_factors(W, C, 4, shrinkage=0.0)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    A, B = whitened_factors(W, C, 4, cross=C, shrinkage=0.1)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()


def test_dense_target_beats_plain_whitening_on_its_objective():
    W, Xd = _data(tokens=300)
    g = torch.Generator().manual_seed(1)
    Xc = Xd + 0.3 * torch.randn(Xd.shape, generator=g, dtype=torch.float64) * Xd.std(1, keepdim=True)
    Ccc, Cdc, Cdd = Xc @ Xc.T, Xd @ Xc.T, Xd @ Xd.T
    for k in (3, 8):
        A, B = whitened_factors(W, Ccc, k, cross=Cdc)
        A1, B1 = whitened_factors(W, Ccc, k)
        direct = float(((W @ Xd - A @ B @ Xc) ** 2).sum())
        assert math.isclose(output_error(W, A, B, Ccc, Cdc, Cdd), direct, rel_tol=1e-8)
        assert direct < float(((W @ Xd - A1 @ B1 @ Xc) ** 2).sum())
        # the closed form is the optimum: refinement cannot improve it, but does improve plain whitening
        A2, B2 = refine_factors(W, A, B, Ccc, cross=Cdc)
        assert output_error(W, A2, B2, Ccc, Cdc, Cdd) >= direct * (1 - 1e-8)
        A3, B3 = refine_factors(W, A1, B1, Ccc, cross=Cdc)
        assert output_error(W, A3, B3, Ccc, Cdc, Cdd) < output_error(W, A1, B1, Ccc, Cdc, Cdd)


def test_asvd_full_rank_is_exact_and_rank_is_kept():
    W, X = _data()
    A, B = asvd_factors(W, X.abs().mean(1), 16)
    assert torch.allclose(A @ B, W, atol=1e-8)
    A, B = asvd_factors(W, X.abs().mean(1), 5)
    assert A.shape == (24, 5) and B.shape == (5, 16)


@pytest.mark.parametrize("backend", ["svd", "asvd", "whiten"])
def test_error_profile_matches_direct_truncation(backend):
    W, X = _data()
    C = X @ X.T / X.shape[1]
    f = torch.rand(W.shape[0], dtype=torch.float64) + 0.1
    absm = X.abs().mean(1)
    prof = truncation_error_profile(W, C, f, backend=backend, abs_mean=absm)
    assert prof.shape == (17,) and prof[-1] == 0
    for k in (1, 4, 10):
        A, B = {
            "svd": lambda: truncated_svd_factors(W, k),
            "asvd": lambda: asvd_factors(W, absm, k),
            "whiten": lambda: whitened_factors(W, C, k),
        }[backend]()
        D = W - A @ B
        direct = float((f * (D @ C * D).sum(1)).sum())
        assert math.isclose(float(prof[k]), direct, rel_tol=1e-6, abs_tol=1e-10)


def _uniform_loss(curves, reduction):
    from compress.lowrank_math import rank_for_reduction

    return sum(float(loss[rank_for_reduction(m, n, reduction)]) for m, n, loss in curves.values())


def test_allocation_meets_budget_and_beats_uniform_on_planted_curves():
    # planted: "easy" matrices are exactly low rank (loss 0 beyond rank 8), "hard" ones decay slowly
    curves = {}
    for i in range(6):
        m, n = 96, 64
        k = torch.arange(0, 65, dtype=torch.float64)
        if i % 2:
            loss = torch.where(k >= 8, torch.zeros_like(k), 8.0 - k)
        else:
            loss = 10.0 * (1 - k / 64) ** 2
        curves[f"m{i}"] = (m, n, loss)
    dense = 6 * 96 * 64
    for reduction in (0.2, 0.4, 0.6):
        ranks = allocate_ranks(curves, reduction)
        after = sum(96 * 64 if r is None else r * 160 for r in ranks.values())
        achieved = 1 - after / dense
        assert reduction <= achieved <= reduction + 0.005
        alloc_loss = sum(0.0 if r is None else float(curves[n][2][r]) for n, r in ranks.items())
        assert alloc_loss < _uniform_loss(curves, reduction)
        assert all(r is None or r <= breakeven_rank(96, 64) for r in ranks.values())
