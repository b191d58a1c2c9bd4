import math

import pytest
import torch

from compress.lowrank_math import (
    Whitening,
    _symmetrise_,
    allocate_ranks,
    asvd_factors,
    breakeven_rank,
    damped_cholesky,
    output_error,
    refine_factors,
    top_factors,
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


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (30, 30)])
def test_top_factors_are_the_truncated_svd(shape):
    g = torch.Generator().manual_seed(1)
    Z = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.logspace(0, -3, shape[1], dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(Z, full_matrices=False)
    for k in (1, 7, min(shape) - 1, min(shape)):
        A, B = top_factors(Z, k)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        assert torch.allclose(A @ B, best, atol=1e-12 * float(S[0]), rtol=0)
        # the sqrt(S) split of the factors: both carry the singular values' square roots, largest first
        assert torch.allclose(A.norm(dim=0) ** 2, S[:k], rtol=1e-8)
        assert torch.allclose(B.norm(dim=1) ** 2, S[:k], rtol=1e-8)


@pytest.mark.parametrize("tokens", [200, 5])  # 5 tokens: rank-deficient, damped
def test_a_consumed_whitening_gives_the_same_factors(tokens):
    W, X = _data(tokens=tokens)
    C = X @ X.T
    for cross in (None, C + 0.01 * torch.eye(16, dtype=torch.float64)):
        expected = whitened_factors(W, C, 6, cross=cross, shrinkage=0.1)
        given_up = C.clone()
        whitening = Whitening.of(given_up, 0.1, consume=True)
        assert torch.equal(whitening.diagonal, C.diagonal())
        got = whitened_factors(W, whitening, 6, cross=cross, shrinkage=0.1)
        assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_in_place_symmetrise_matches_the_out_of_place_expression_bit_for_bit():
    M = torch.randn(37, 37, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = M.clone().add_(M.T).div_(2)
    assert torch.equal(_symmetrise_(M.clone(), block=8), expected)


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


def test_output_side_moments_give_what_the_input_side_ones_give():
    """For a module with fewer outputs than inputs the engine may measure W C_dc (target_cross) instead of C_dc,
    and W C W^T with C's diagonal (output_cov, input_power) instead of C: the factors, the refit and the error
    curve are the same as from the n x n moments, to rounding."""
    W, Xd = _data(m=10, n=24, tokens=300)
    g = torch.Generator().manual_seed(1)
    Xc = Xd + 0.3 * torch.randn(Xd.shape, generator=g, dtype=torch.float64) * Xd.std(1, keepdim=True)
    Ccc, Cdc = Xc @ Xc.T, Xd @ Xc.T
    Yd, Yc = W @ Xd, W @ Xc  # the dense module's outputs, and the module's own on the current inputs
    for k in (3, 8):
        want = whitened_factors(W, Ccc, k, cross=Cdc, shrinkage=0.1)
        got = whitened_factors(W, Ccc, k, target_cross=Yd @ Xc.T, shrinkage=0.1)
        assert torch.allclose(want[0] @ want[1], got[0] @ got[1], rtol=0, atol=1e-10 * float(W.abs().max()))
        want = refine_factors(W, *want, Ccc, cross=Cdc, shrinkage=0.1)
        got = refine_factors(W, *got, Ccc, target_cross=Yd @ Xc.T, shrinkage=0.1)
        assert torch.allclose(want[0] @ want[1], got[0] @ got[1], rtol=0, atol=1e-10 * float(W.abs().max()))
    f = torch.rand(10, dtype=torch.float64) + 0.1
    for backend in ("svd", "whiten"):
        want = truncation_error_profile(W, Ccc, f, backend=backend, shrinkage=0.1)
        got = truncation_error_profile(
            W, None, f, backend=backend, shrinkage=0.1, output_cov=Yc @ Yc.T, input_power=(Xc**2).sum(1)
        )
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12 * float(want[0]))
    with pytest.raises(ValueError):  # a tall matrix's curve needs C itself
        truncation_error_profile(W.T, None, output_cov=Xc.T @ Xc, input_power=(Yc**2).sum(1))
    with pytest.raises(ValueError):
        whitened_factors(W, Ccc, 3, cross=Cdc, target_cross=Yd @ Xc.T)


def test_asvd_full_rank_is_exact_and_rank_is_kept():
    W, X = _data()
    A, B = asvd_factors(W, X.abs().mean(1), 16)
    assert torch.allclose(A @ B, W, atol=1e-8)
    A, B = asvd_factors(W, X.abs().mean(1), 5)
    assert A.shape == (24, 5) and B.shape == (5, 16)


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)], ids=["tall", "wide"])
@pytest.mark.parametrize("backend", ["svd", "asvd", "whiten", "whiten-shrunk"])
def test_error_profile_matches_direct_truncation(backend, shape):
    W, X = _data(*shape)
    C = X @ X.T / X.shape[1]
    f = torch.rand(W.shape[0], dtype=torch.float64) + 0.1
    absm = X.abs().mean(1)
    shrinkage = 0.1 if backend == "whiten-shrunk" else 0.0
    prof = truncation_error_profile(
        W, C, f, backend=backend.removesuffix("-shrunk"), abs_mean=absm, shrinkage=shrinkage
    )
    assert prof.shape == (17,) and prof[-1] == 0
    for k in (1, 4, 10):
        A, B = {
            "svd": lambda: truncated_svd_factors(W, k),
            "asvd": lambda: asvd_factors(W, absm, k),
            "whiten": lambda: whitened_factors(W, C, k),
            "whiten-shrunk": lambda: whitened_factors(W, C, k, shrinkage=shrinkage),
        }[backend]()
        D = W - A @ B
        direct = float((f * (D @ C * D).sum(1)).sum())  # the error is measured on the unshrunk C
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


def test_modules_sharing_an_input_share_one_whitening_and_give_up_its_covariance():
    from compress.methods.lowrank.apply import factorise

    W, X = _data()
    C = X @ X.T
    stats = {"cov": C.clone(), "abs_mean": X.abs().mean(1)}  # one input read by two modules (q and k, say)
    first = factorise(W, 5, "whiten", stats, shrinkage=0.1)
    assert "cov" not in stats and isinstance(stats["whitening"], Whitening)  # the covariance is given up for it
    second = factorise(2 * W, 5, "whiten", stats, shrinkage=0.1)
    for got, weight in ((first, W), (second, 2 * W)):
        assert all(torch.equal(a, b) for a, b in zip(got, whitened_factors(weight, C, 5, shrinkage=0.1)))
    kept = {"cov": C.clone()}
    factorise(W, 5, "whiten", kept, shrinkage=0.1, refine=True)  # refine reads the covariance afterwards
    assert torch.equal(kept["cov"], C)


def test_whitened_extension_of_fixed_factors_is_the_best_extension():
    # the whitened problem's optima are nested (Eckart-Young): extending the rank-3 optimum by 5 ranks must give
    # the rank-8 optimum; extending any other rank-3 part must do no worse than the rank-8 optimum's error
    # restricted to containing that part (checked against random extensions)
    W, Xd = _data()
    g = torch.Generator().manual_seed(3)
    Xc = Xd + 0.3 * torch.randn(Xd.shape, generator=g, dtype=torch.float64) * Xd.std(1, keepdim=True)
    Ccc, Cdc, Cdd = Xc @ Xc.T, Xd @ Xc.T, Xd @ Xd.T
    A3, B3 = whitened_factors(W, Ccc, 3, cross=Cdc, shrinkage=0.1)
    A8, B8 = whitened_factors(W, Ccc, 8, cross=Cdc, shrinkage=0.1)
    A, B = whitened_factors(W, Ccc, 5, cross=Cdc, shrinkage=0.1, fixed=(A3, B3))
    assert torch.allclose(A3 @ B3 + A @ B, A8 @ B8, atol=1e-8)
    P0, Q0 = torch.randn(24, 3, generator=g, dtype=torch.float64), torch.randn(3, 16, generator=g, dtype=torch.float64)
    A, B = whitened_factors(W, Ccc, 5, cross=Cdc, fixed=(P0, Q0))
    best = output_error(W, torch.cat([P0, A], 1), torch.cat([Q0, B]), Ccc, Cdc, Cdd)
    for _ in range(5):
        dA = 1e-3 * torch.randn(A.shape, generator=g, dtype=torch.float64)
        other = output_error(W, torch.cat([P0, A + dA], 1), torch.cat([Q0, B]), Ccc, Cdc, Cdd)
        assert other > best
