"""LOST split of one matrix: W ~= U_r V_r + S_c with S_c non-zero in c input channels (columns).

Plain LOST (``refine_iters=0``): SVD of W, top-r components as the low-rank factors, then the c
columns of the residual W - U_r V_r with the largest norms are stored exactly as S_c, so the error
is the residual in the other columns. Refinement alternates two exact steps, each of which can
only lower that error: refit the rank-r SVD on W with the chosen columns removed (they are held
by S_c anyway), then re-pick the c largest residual columns.

A per-channel scale a (optional) weights column j's error by a_j (diagonal activation scaling).
With a full input covariance C = L L^T (``cov``, "whitening") the error is tr(E C E^T): the
low-rank part is the SVD of (W - S_c) L mapped back by L^-1, channels are picked by their
single-channel gain ||(R C)_j||^2 / C_jj, and S_c's columns are the exact least-squares fit
(R C)_J C_JJ^-1 of the residual R on the chosen channels J (they also absorb the residual's
correlated part in the other channels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...lowrank_math import positive_cholesky


@dataclass
class LowRankSparseFactors:
    U: torch.Tensor  # [m, r]
    V: torch.Tensor  # [r, n]
    sc_values: torch.Tensor  # [m, c]
    sc_channels: torch.Tensor  # [c] int64
    error: float  # relative (scaled) error
    plain_error: float  # the same before refinement
    svd_error: float  # truncated SVD with the same number of values, for reference


def _svd(W: torch.Tensor):
    return torch.linalg.svd(W, full_matrices=False)


SPLIT_GRID = (0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


def _best_split_whitened(W: torch.Tensor, budget: int, cov: torch.Tensor) -> tuple[int, int, float]:
    """Plain whitened LOST scored on a grid of sparse fractions (SPLIT_GRID), from one SVD."""
    m, n = W.shape
    w = _Whitened(W, cov)
    svd = _svd(w.W @ w.L)
    best = (0, 0, float("inf"))
    for fraction in SPLIT_GRID:
        c = min(n, int(fraction * budget // m))
        r = min((budget - c * m) // (m + n), svd[1].numel())
        if r < 1:
            continue
        A, B = w.lowrank(w.W, r, svd)
        J, S_J = w.channels(w.W - A @ B, c)
        err = w.error(w.W - A @ B - _place(S_J, J, n))
        if err < best[2]:
            best = (r, c, err)
    return best


def best_split(
    W: torch.Tensor,
    budget: int,
    scale: torch.Tensor | None = None,
    max_channels: int | None = None,
    cov: torch.Tensor | None = None,
) -> tuple[int, int, float]:
    """(rank, channels, relative error) of plain LOST minimising the error for ``budget`` values.

    Every split r (m + n) + c m <= budget is scored exactly from one SVD: the residual of the
    rank-r truncation has squared column norms sum_{i >= r} sigma_i^2 V_ji^2 (a cumulative sum),
    and S_c removes the c largest. c = 0 (plain SVD) is a candidate, so the chosen split is never
    worse than truncated SVD at the same number of values. With ``cov`` (whitening) the error
    does not separate by columns: the fractions in SPLIT_GRID are scored instead.
    """
    if cov is not None:
        return _best_split_whitened(W, budget, cov)
    m, n = W.shape
    Wd = W.detach().to(torch.float64)
    if scale is not None:
        Wd = Wd * scale.to(torch.float64)[None, :]
    _, sig, Vh = _svd(Wd)
    # tail[r, j] = sum_{i >= r} sigma_i^2 Vh[i, j]^2 : column energies of the rank-r residual
    contrib = sig[:, None].pow(2) * Vh.pow(2)
    tail = torch.cat([contrib.flip(0).cumsum(0).flip(0), torch.zeros(1, n, dtype=contrib.dtype, device=contrib.device)])
    total = sig.pow(2).sum().clamp_min(1e-300)
    limit = min(n, budget // m if max_channels is None else max_channels)
    best = (0, 0, float("inf"))
    sorted_rows: dict[int, torch.Tensor] = {}
    for c in range(0, limit + 1):
        r = min((budget - c * m) // (m + n), sig.numel())
        if r < 1:
            break
        if r not in sorted_rows:
            sorted_rows[r] = tail[r].sort(descending=True).values.cumsum(0)
        removed = sorted_rows[r][c - 1] if c else 0.0
        err = float(((tail[r].sum() - removed).clamp_min(0) / total).sqrt())
        if err < best[2]:
            best = (r, c, err)
    return best


class _Whitened:
    """The pieces of the covariance-weighted LOST fit for one matrix (float64)."""

    def __init__(self, W: torch.Tensor, cov: torch.Tensor):
        self.W = W.detach().to(torch.float64)
        self.C = cov.to(device=self.W.device, dtype=torch.float64)
        self.L = positive_cholesky(self.C)
        self.C = self.L @ self.L.T  # the (possibly ridged) matrix actually factorised
        self.total = (self.W @ self.L).pow(2).sum().clamp_min(1e-300)

    def lowrank(self, M: torch.Tensor, rank: int, svd=None):
        """Best rank-r approximation of M in the C-norm: factors (A, B) with A B = U_r S_r V_r^T L^-1."""
        U, sig, Vh = svd if svd is not None else _svd(M @ self.L)
        root = sig[:rank].sqrt()
        A = U[:, :rank] * root
        B = torch.linalg.solve_triangular(self.L, root[:, None] * Vh[:rank], upper=False, left=False)
        return A, B

    def channels(self, R: torch.Tensor, c: int, select: str = "residual", seed: int = 0):
        """Chosen channels J and S_J = (R C)_J C_JJ^-1 for the residual R."""
        n = R.shape[1]
        if c == 0:
            return torch.zeros(0, dtype=torch.long, device=R.device), R.new_zeros(R.shape[0], 0)
        RC = R @ self.C
        if select == "random":
            gen = torch.Generator().manual_seed(seed)
            J = torch.randperm(n, generator=gen)[:c].sort().values.to(R.device)
        else:
            gains = RC.pow(2).sum(0) / self.C.diagonal().clamp_min(1e-300)
            J = gains.topk(c).indices.sort().values
        S_J = torch.linalg.solve(self.C[J][:, J], RC[:, J].T).T
        return J, S_J

    def error(self, E: torch.Tensor) -> float:
        return float(((E @ self.L).pow(2).sum() / self.total).sqrt())


def _place(values: torch.Tensor, J: torch.Tensor, n: int) -> torch.Tensor:
    dense = values.new_zeros(values.shape[0], n)
    dense[:, J] = values
    return dense


def _lost_whitened(W, rank, channels, refine_iters, cov, select, seed) -> LowRankSparseFactors:
    m, n = W.shape
    w = _Whitened(W, cov)
    svd = _svd(w.W @ w.L)
    energy = svd[1].pow(2)
    svd_rank = min((rank * (m + n) + channels * m) // (m + n), energy.numel())
    svd_error = float((energy[svd_rank:].sum() / energy.sum().clamp_min(1e-300)).sqrt())
    A, B = w.lowrank(w.W, rank, svd)
    J, S_J = w.channels(w.W - A @ B, channels, select, seed)
    plain = best = w.error(w.W - A @ B - _place(S_J, J, n))
    for _ in range(refine_iters if select == "residual" and channels else 0):
        A2, B2 = w.lowrank(w.W - _place(S_J, J, n), rank)
        J2, S_J2 = w.channels(w.W - A2 @ B2, channels)
        err = w.error(w.W - A2 @ B2 - _place(S_J2, J2, n))
        if err >= best - 1e-12:
            break
        best, A, B, J, S_J = err, A2, B2, J2, S_J2
    return LowRankSparseFactors(A.float(), B.float(), S_J.float(), J, best, plain, svd_error)


def lowrank_sparse_factorize(
    W: torch.Tensor,
    rank: int,
    channels: int,
    refine_iters: int = 2,
    scale: torch.Tensor | None = None,
    select: str = "residual",
    seed: int = 0,
    cov: torch.Tensor | None = None,
) -> LowRankSparseFactors:
    """Factor ``W`` [m, n]; float64 maths, float32 results. ``select='random'`` is the ablation.

    ``scale`` [n] weights column j's error by scale[j]; ``cov`` [n, n] (positive definite) by the
    full input covariance (at most one of the two).
    """
    m, n = W.shape
    if not 0 < rank <= min(m, n) or not 0 <= channels <= n:
        raise ValueError(f"rank {rank} / channels {channels} out of range for a {m}x{n} matrix")
    if scale is not None and cov is not None:
        raise ValueError("give at most one of scale and cov")
    if cov is not None:
        return _lost_whitened(W, rank, channels, refine_iters, cov, select, seed)
    Wd = W.detach().to(torch.float64)
    if scale is not None:
        Wd = Wd * scale.to(torch.float64)[None, :]
    norm = Wd.norm().clamp_min(1e-300)
    U, sig, Vh = _svd(Wd)
    energy = sig.pow(2)
    svd_rank = min((rank * (m + n) + channels * m) // (m + n), sig.numel())
    svd_error = float((energy[svd_rank:].sum() / energy.sum().clamp_min(1e-300)).sqrt())

    def pick(residual: torch.Tensor) -> torch.Tensor:
        if channels == 0:
            return torch.zeros(0, dtype=torch.long, device=Wd.device)
        if select == "random":
            gen = torch.Generator().manual_seed(seed)
            return torch.randperm(n, generator=gen)[:channels].sort().values.to(Wd.device)
        return residual.norm(dim=0).topk(channels).indices.sort().values

    def error(residual: torch.Tensor, chosen: torch.Tensor) -> float:
        keep = torch.ones(n, dtype=torch.bool, device=Wd.device)
        keep[chosen] = False
        return float((residual[:, keep].norm() / norm).item())

    low = (U[:, :rank] * sig[:rank]) @ Vh[:rank]
    chosen = pick(Wd - low)
    factors = (U[:, :rank], sig[:rank], Vh[:rank])
    plain = error(Wd - low, chosen)
    best = plain
    for _ in range(refine_iters if select == "residual" and channels else 0):
        rest = Wd.clone()
        rest[:, chosen] = 0
        U2, sig2, Vh2 = _svd(rest)
        low2 = (U2[:, :rank] * sig2[:rank]) @ Vh2[:rank]
        new = pick(Wd - low2)
        err = error(Wd - low2, new)
        if err >= best - 1e-12:
            break
        best, low, chosen, factors = err, low2, new, (U2[:, :rank], sig2[:rank], Vh2[:rank])
    Ur, sr, Vr = factors
    root = sr.sqrt()
    A = Ur * root
    B = root[:, None] * Vr
    sc = (Wd - low)[:, chosen]
    if scale is not None:
        s64 = scale.to(torch.float64)
        B = B / s64[None, :]
        sc = sc / s64[chosen][None, :]
    return LowRankSparseFactors(A.float(), B.float(), sc.float(), chosen, best, plain, svd_error)
