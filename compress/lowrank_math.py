"""Shared low-rank maths: parameter accounting and truncated-SVD factors."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch


def lowrank_params(out_features: int, in_features: int, rank: int) -> int:
    return rank * (out_features + in_features)


def breakeven_rank(out_features: int, in_features: int) -> int:
    """Largest rank that still saves parameters: k (m + n) < m n."""
    m, n = out_features, in_features
    return (m * n - 1) // (m + n)


def rank_for_reduction(out_features: int, in_features: int, reduction: float) -> int:
    """Largest rank whose factors remove at least ``reduction`` of an m x n matrix's parameters."""
    m, n = out_features, in_features
    return max(1, int((1.0 - reduction) * m * n // (m + n)))


def truncated_svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = U_k sqrt(S_k), B = sqrt(S_k) V_k^T, computed in float64, returned in weight's dtype.

    Splitting sqrt(S) over both factors (WeLore's choice) keeps their scales balanced,
    which matters once the factors are fine-tuned.
    """
    U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    root = S[:rank].sqrt()
    A = U[:, :rank] * root
    B = root[:, None] * Vh[:rank]
    return A.to(weight.dtype), B.to(weight.dtype)


def normalised_spectrum(weight: torch.Tensor) -> torch.Tensor:
    """WeLore's s' = (s - min s) / (max s - min s), descending, float64."""
    # full svd's driver (gesdd) is ~3x faster here than svdvals' for these shapes
    s = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False).S
    span = (s.max() - s.min()).clamp_min(torch.finfo(torch.float64).tiny)
    return (s - s.min()) / span


# --------------------------------------------------------------------------------------------
# Activation-aware decompositions. Convention: X is (in_features x tokens), so the input
# covariance is C = X X^T (in x in); W is (out x in) and the layer computes W x.
# Every function works in float64 and returns factors A (out x k), B (k x in), W ~= A B.
# --------------------------------------------------------------------------------------------


def damped_cholesky(
    cov: torch.Tensor, start: float = 1e-6, grow: float = 10.0, max_tries: int = 30, overwrite: bool = False
) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor L of ``cov + eps I`` (L L^T), with the smallest working damping.

    ``eps`` starts at ``start * mean(diag(cov))`` (0 only if the matrix is exactly positive
    definite already) and grows by ``grow`` until the factorisation succeeds, so rank-deficient
    or all-zero activations still give a finite, invertible factor. Returns ``(L, eps)``.
    ``overwrite`` (a float64 ``cov`` the caller gives up): the work happens in its storage instead
    of a copy, which at 7B shapes is 1 GB less at the peak; ``cov`` then holds the damped matrix.
    """
    # (cov + cov^T) / 2 and cov + eps I, built in place on one matrix: at 7B shapes every n x n float64 matrix
    # is 1 GB (the values are those of the out-of-place expressions, bit for bit)
    if overwrite and cov.dtype == torch.float64:
        cov = _symmetrise_(cov.detach())
    else:
        source = cov.detach()
        cov = source.to(torch.float64, copy=True)
        cov.add_(source.T.to(torch.float64)).div_(2)
    L, info = torch.linalg.cholesky_ex(cov)
    if _factorised(L, info):
        return L, 0.0
    scale = float(cov.diagonal().mean().clamp_min(0))
    eps = start * scale if scale > 0 and torch.isfinite(torch.tensor(scale)) else 1e-6
    diagonal = cov.diagonal().clone()
    for _ in range(max_tries):
        del L
        cov.diagonal().copy_(diagonal + eps)
        L, info = torch.linalg.cholesky_ex(cov)
        if _factorised(L, info):
            return L, eps
        eps *= grow
    raise FloatingPointError("damped_cholesky: covariance could not be factorised (non-finite entries?)")


def _factorised(L: torch.Tensor, info: torch.Tensor, block: int = 1024) -> bool:
    """Cholesky succeeded: LAPACK's info, a positive diagonal and finite entries, checked a block of rows at a
    time (``torch.isfinite`` of the whole factor holds temporaries of its size: 1.3 GB at n = 11008)."""
    if int(info) != 0 or not bool((L.diagonal() > 0).all()):
        return False
    return all(bool(torch.isfinite(L[i : i + block]).all()) for i in range(0, L.shape[0], block))


def _symmetrise_(C: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``C = (C + C^T) / 2`` in place, block by block (each pair of entries summed in the same order as the
    out-of-place expression, so the result is the same bit for bit)."""
    n = C.shape[0]
    for i in range(0, n, block):
        for j in range(i, n, block):
            upper = C[i : i + block, j : j + block]
            upper.add_(C[j : j + block, i : i + block].T.clone()).div_(2)
            if j != i:
                C[j : j + block, i : i + block].copy_(upper.T)
    return C


def positive_cholesky(cov: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a covariance that should be positive definite: the exact factor when it exists,
    else the one of ``cov + eps I`` with the smallest eps in 1e-10, 1e-8, ... times the mean variance (the
    ridge schedule dsformer's and LOST's whitened fits were measured with)."""
    return damped_cholesky(cov, start=1e-10, grow=100.0)[0]


def shrink(cov: torch.Tensor, diag_source: torch.Tensor, shrinkage: float, ridge: float = 0.0) -> torch.Tensor:
    """``cov + shrinkage * diag(diag_source) + ridge * mean(diag(diag_source)) I`` in float64.

    Shrinking a covariance toward the diagonal: adding the same ``s diag(C_cc)`` to C_cc and to C_dc
    is exactly the least-squares problem with extra pseudo-tokens ``sqrt(s C_ii) e_i`` on which the
    dense and the current inputs agree, a ridge penalty that fights over-fitting the calibration set.
    ``ridge`` (relative to the mean variance) keeps a Cholesky factor well defined when some channels
    are never active.
    """
    if shrinkage <= 0 and ridge <= 0:
        return cov.to(torch.float64)
    diag = diag_source.to(torch.float64)
    diag = (diag if diag.dim() == 1 else diag.diagonal()).clamp_min(0)  # a matrix or its diagonal
    C = cov.to(torch.float64, copy=True)  # the diagonal added in place: no second n x n matrix
    C.diagonal().add_(shrinkage * diag + ridge * diag.mean().clamp_min(1e-30))
    return C


def _split_sqrt(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = S[:rank].clamp_min(0).sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def target_moment(
    W: torch.Tensor,
    diagonal: torch.Tensor,
    shrinkage: float,
    cross: torch.Tensor | None = None,
    target_cross: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W D`` with ``D = shrink(C_dc, diag(C_cc), shrinkage)`` (float64, m x n): the dense target's moment
    against the current inputs, from ``cross = C_dc`` (n x n) or ``target_cross = W C_dc`` (m x n: measured as
    the dense module's outputs against the current inputs, smaller where the module has fewer outputs than
    inputs). ``diagonal``: C_cc's diagonal."""
    W = W.to(torch.float64)
    if (cross is None) == (target_cross is None):
        raise ValueError("target_moment needs exactly one of cross and target_cross")
    if target_cross is None:
        return W @ shrink(cross, diagonal, shrinkage)
    WD = target_cross.to(torch.float64, copy=True)
    if shrinkage > 0:  # W s diag(C_cc): W's columns scaled
        WD += shrinkage * W * diagonal.to(torch.float64).clamp_min(0)
    return WD


def asvd_scales(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """ASVD's column scales ``s = mean|x|^alpha`` (float64), clamped away from zero: a channel that is never
    active gets the smallest positive scale seen."""
    s = abs_mean.detach().to(torch.float64).clamp_min(0) ** alpha
    positive = s[s > 0]
    floor = float(positive.min()) if positive.numel() else 1.0
    return s.clamp_min(max(floor, 1e-12))


def asvd_factors(
    weight: torch.Tensor, abs_mean: torch.Tensor, rank: int, alpha: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD (arXiv 2312.05821): SVD of ``W diag(s)``, ``s = mean|x|^alpha``, then un-scale B.

    Channels that carry large activations are kept more faithfully. ``s`` is clamped away
    from zero (a channel that is never active gets the smallest positive scale seen).
    """
    W = weight.detach().to(torch.float64)
    s = asvd_scales(abs_mean, alpha)
    U, S, Vh = torch.linalg.svd(W * s, full_matrices=False)
    A, B = _split_sqrt(U, S, Vh, rank)
    return A, B / s


@dataclass
class Whitening:
    """What the whitened factorisations need of an input covariance C: the lower Cholesky factor L of the
    shrunk ``C + s diag(C)`` (damped, :func:`damped_cholesky`) and C's diagonal. Computed once per distinct
    input (q/k/v share theirs) and kept instead of C: at 7B shapes each n x n float64 matrix is 1 GB."""

    L: torch.Tensor
    diagonal: torch.Tensor

    @classmethod
    def of(cls, cov: torch.Tensor, shrinkage: float = 0.0, consume: bool = False) -> Whitening:
        """``consume``: ``cov`` (float64) is the caller's to give up; it is shrunk and factorised in its own
        storage (no copy) and holds no meaningful values afterwards."""
        diagonal = cov.detach().diagonal().to(torch.float64, copy=True)
        if consume and cov.dtype == torch.float64:
            C = cov.detach()
            if shrinkage > 0:
                C.diagonal().add_(shrinkage * diagonal.clamp_min(0))
        else:
            C = shrink(cov, cov, shrinkage)
        L, _ = damped_cholesky(C, overwrite=True)  # C is this function's own here (consumed or a fresh copy)
        return cls(L, diagonal)


def whitened_factors(
    weight: torch.Tensor,
    cov: torch.Tensor | Whitening,
    rank: int,
    cross: torch.Tensor | None = None,
    shrinkage: float = 0.0,
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None,
    target_cross: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact rank-k minimiser of ``||W X_d - W' X_c||_F`` given only second moments.

    ``cov = C_cc = X_c X_c^T`` (the inputs the compressed layer will see; or its :class:`Whitening`,
    computed with the same ``shrinkage``) and ``cross = C_dc = X_d X_c^T`` (dense-model inputs against
    current inputs; or ``target_cross = W C_dc``, as the engine measures it for a module with fewer outputs than
    inputs). With neither the target is ``W X_c`` itself (C_dc = C_cc): that is SVD-LLM's truncation-aware
    whitening (arXiv 2403.07378).

    Derivation: with ``C_cc = L L^T`` the objective is ``const + ||W' L - W C_dc L^{-T}||_F^2``,
    so ``W' = [W C_dc L^{-T}]_k L^{-1}`` (Eckart-Young on the whitened target). ``shrinkage``
    adds ``s diag(C_cc)`` to both covariances first (see :func:`shrink`). Cholesky is damped
    (:func:`damped_cholesky`), so rank-deficient activations stay finite.

    ``fixed = (A0, B0)``: factors that stay as they are; the rank-k factors returned fit what they leave,
    ``||W X_d - A0 B0 X_c - W' X_c||_F``, so ``[A0 A] [B0; B]`` is the best extension of the fixed part.
    The target's cross-moment becomes ``W C_dc - A0 B0 C_cc``, and whitened ``Z - A0 B0 L`` (``C_cc = L L^T``).
    """
    whitening = cov if isinstance(cov, Whitening) else Whitening.of(cov, shrinkage)
    L = whitening.L
    W = weight.detach().to(torch.float64)
    if cross is None and target_cross is None:
        Z = W @ L  # W C L^{-T} = W L L^T L^{-T} = W L
    else:
        WD = target_moment(W, whitening.diagonal, shrinkage, cross=cross, target_cross=target_cross)
        # Z = W D L^{-T}  <=>  Z^T = L^{-1} (W D)^T
        Z = torch.linalg.solve_triangular(L, WD.T, upper=False).T
        del WD
    del W
    if fixed is not None:
        A0, B0 = fixed
        Z -= A0.to(torch.float64) @ (B0.to(torch.float64) @ L)
    A, Bw = top_factors(Z, rank)
    del Z
    # B = Bw L^{-1}  <=>  B^T = L^{-T} Bw^T
    B = torch.linalg.solve_triangular(L.T, Bw.T, upper=True).T
    return A, B


def top_factors(Z: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Z's best rank-k approximation as ``A B`` with ``A = U_k sqrt(S_k)``, ``B = sqrt(S_k) V_k^T`` (float64),
    from the eigendecomposition of the smaller Gram matrix (Z Z^T or Z^T Z) instead of an SVD of Z: at 7B
    shapes (4096 x 11008) it needs a quarter of the SVD's memory and runs several times faster. The squared
    spectrum loses relative accuracy only below about 1e-8 of the largest singular value, where
    a direction's share of the error is negligible; the product A B is the projection of Z onto its top-k
    singular subspace either way."""
    m, n = Z.shape
    wide = m <= n
    G = Z @ Z.T if wide else Z.T @ Z
    eigenvalues, vectors = torch.linalg.eigh(G)
    del G
    k = min(rank, eigenvalues.numel())
    order = torch.arange(eigenvalues.numel() - 1, eigenvalues.numel() - 1 - k, -1, device=Z.device)
    S = eigenvalues[order].clamp_min(0).sqrt()
    V = vectors[:, order]  # left (wide) or right singular vectors, largest first
    del vectors
    root = S.sqrt()
    inverse_root = torch.where(S > 0, 1 / root.clamp_min(torch.finfo(S.dtype).tiny), torch.zeros_like(root))
    if wide:  # A = U sqrt(S), B = sqrt(S) V^T = S^{-1/2} U^T Z
        return V * root, inverse_root[:, None] * (V.T @ Z)
    return (Z @ V) * inverse_root, root[:, None] * V.T  # A = Z V S^{-1/2}, B = sqrt(S) V^T


def output_error(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    cov: torch.Tensor,
    cross: torch.Tensor | None = None,
    dense_cov: torch.Tensor | None = None,
) -> float:
    """``||W X_d - A B X_c||_F^2`` from second moments (``cross``/``dense_cov`` None: X_d = X_c)."""
    W = weight.detach().to(torch.float64)
    Wp = A.to(torch.float64) @ B.to(torch.float64)
    cov = cov.to(torch.float64)
    cross = cov if cross is None else cross.to(torch.float64)
    dense_cov = cov if dense_cov is None else dense_cov.to(torch.float64)
    value = (W @ dense_cov * W).sum() - 2 * (W @ cross * Wp).sum() + (Wp @ cov * Wp).sum()
    return float(value)


def refine_factors(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    cov: torch.Tensor,
    cross: torch.Tensor | None = None,
    shrinkage: float = 0.0,
    sweeps: int = 1,
    target_cross: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form least-squares refits of ``||W X_d - A B X_c||_F`` (alternating, ``sweeps`` rounds).

    B-step (A fixed): ``B = (A^T A)^{-1} A^T W C_dc C_cc^{-1}``; A-step (B fixed):
    ``A = W C_dc B^T (B C_cc B^T)^{-1}``. Each step cannot increase the objective, so the
    result is never worse than the input factors on the (shrunk) calibration statistics.
    After :func:`whitened_factors` with the same ``cross``/``shrinkage`` it is already optimal. ``target_cross``
    (``W C_dc``) stands in for ``cross`` as in :func:`whitened_factors`.
    """
    W = weight.detach().to(torch.float64)
    A, B = A.to(torch.float64), B.to(torch.float64)
    C = shrink(cov, cov, shrinkage)
    if cross is None and target_cross is None:
        WD = W @ C
    else:
        WD = target_moment(W, cov.diagonal(), shrinkage, cross=cross, target_cross=target_cross)
    L, eps = damped_cholesky(C)
    C = C + eps * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    for _ in range(sweeps):
        T = torch.cholesky_solve(WD.T, L).T  # W D C^{-1}
        B = torch.linalg.lstsq(A, T).solution
        G = B @ C @ B.T
        Lg, _ = damped_cholesky(G, start=1e-10)
        A = torch.cholesky_solve((WD @ B.T).T, Lg).T
    # rebalance the scales of the two factors (keeps fine-tuning well conditioned)
    na, nb = A.norm(dim=0), B.norm(dim=1)
    ratio = torch.where((na > 0) & (nb > 0), (nb / na.clamp_min(1e-300)).sqrt(), torch.ones_like(na))
    return A * ratio, B / ratio[:, None]


def truncation_error_profile(
    weight: torch.Tensor,
    cov: torch.Tensor | None,
    out_weights: torch.Tensor | None = None,
    backend: str = "whiten",
    abs_mean: torch.Tensor | None = None,
    alpha: float = 0.5,
    shrinkage: float = 0.0,
    output_cov: torch.Tensor | None = None,
    input_power: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted output error ``sum_o f_o E[(W x - W'_k x)_o^2]`` for every rank k = 0 .. min(m, n).

    ``W'_k`` is the backend's rank-k truncation (``svd``, ``asvd`` or ``whiten``; dense-target
    coincides with ``whiten`` on dense statistics). Each of them keeps W's outputs in a k-dimensional
    subspace: with ``A`` what the backend scales the input by before its SVD (svd: I, asvd: diag(s)^2,
    whiten: the shrunk C; ``Z = W A^{1/2}``), ``W'_k = [Z]_k A^{-1/2} = U_k U_k^T W`` where U are the
    eigenvectors of ``Z Z^T = W A W^T``, largest first. The discarded part is ``U_{>k} U_{>k}^T W``, so the
    error at rank k is the tail sum of ``G * M`` with ``G = U^T diag(f) U`` and ``M = U^T W C W^T U``: one
    symmetric eigendecomposition of a min(m, n) square matrix serves every rank (a tall W is reduced to
    its n x n triangle by a QR first), without an SVD, a Cholesky factor or a division by singular values.
    With ``f`` the mean squared loss gradient per output channel (diagonal empirical Fisher) half of this
    is a second-order estimate of the loss increase per token, comparable across matrices.
    A wide W (m <= n) needs of C only ``W C W^T`` and C's diagonal: ``output_cov`` (the outputs' second moment,
    m x m) and ``input_power`` (the diagonal) may stand in for ``cov``.
    Returns float64 of length ``min(m, n) + 1`` (entry k = error at rank k; last entry 0).
    """
    W = weight.detach().to(torch.float64)
    m, n = W.shape
    if cov is None and (output_cov is None or input_power is None or m > n):
        raise ValueError("truncation_error_profile needs cov, or output_cov and input_power for a wide matrix")
    C = None if cov is None else cov.detach().to(torch.float64)
    power = C.diagonal() if C is not None else input_power.detach().to(torch.float64)
    f = (
        torch.ones(W.shape[0], dtype=torch.float64, device=W.device)
        if out_weights is None
        else out_weights.detach().to(torch.float64)
    )
    if backend == "asvd" and abs_mean is None:
        raise ValueError("asvd profile needs abs_mean")
    if backend not in ("svd", "asvd", "whiten", "whiten_dense_target"):
        raise ValueError(f"unknown backend {backend!r}")
    F = None  # the output weights in the coordinates worked in: diag(f), unless a QR rotates them
    if m > n:  # the outputs live in the n columns of Q (W = Q R): work in those coordinates
        Q, W = torch.linalg.qr(W)
        F = Q.T @ (f[:, None] * Q)
        del Q
    WCW = W @ C @ W.T if C is not None else output_cov.detach().to(torch.float64)
    WCW = (WCW + WCW.T) / 2
    if backend == "svd":
        K = W @ W.T
    elif backend == "asvd":
        K = (W * asvd_scales(abs_mean, alpha) ** 2) @ W.T
    else:
        K = WCW + shrinkage * (W * power.clamp_min(0)) @ W.T if shrinkage > 0 else WCW
    U = torch.linalg.eigh((K + K.T) / 2).eigenvectors.flip(1)  # largest first
    FU = f[:, None] * U if F is None else F @ U
    P = (U.T @ FU) * (U.T @ WCW @ U)
    r = P.shape[0]
    # tail(k) = sum_{i,j >= k} P_ij  via  tail(k) = tail(k+1) + P_kk + 2 sum_{j>k} P_kj
    row_after = (
        torch.flip(torch.cumsum(torch.flip(torch.triu(P, diagonal=1), dims=[1]), dim=1), dims=[1])[:, 0]
        if r
        else P.new_zeros(0)
    )
    contrib = P.diagonal() + 2 * row_after
    tail = torch.flip(torch.cumsum(torch.flip(contrib, dims=[0]), dim=0), dims=[0])
    return torch.cat([tail, tail.new_zeros(1)]).clamp_min(0)


def allocate_ranks(
    curves: dict[str, tuple[int, int, torch.Tensor]],
    reduction: float,
    tolerance: float = 0.005,
    allow_dense: bool | Collection[str] = True,
    max_ranks: dict[str, int] | None = None,
) -> dict[str, int | None]:
    """Ranks minimising the summed loss curves under a global parameter budget.

    ``curves[name] = (out_features, in_features, loss)`` with ``loss[k]`` the estimated loss at
    rank k (k = 0 .. min(m, n), or 0 .. ``max_ranks[name]``, the ranks an elastic module stores). A
    matrix either keeps a rank below its break-even rank (and at most ``max_ranks[name]``) or stays
    dense (``None``, loss 0) when ``allow_dense`` (True: every matrix; or the names of those that
    may). The removed fraction lands in ``[reduction, reduction + tolerance]``: a Lagrangian
    bisection on the price of a parameter finds the convex-hull allocation, then a greedy pass
    spends what is left of the budget on the rank increments with the best loss drop per parameter.
    """
    names = list(curves)
    dense = {n: curves[n][0] * curves[n][1] for n in names}
    total = sum(dense.values())
    budget = int((1.0 - reduction) * total)
    options = {}
    for name in names:
        m, n, loss = curves[name]
        kmax = _max_rank(m, n, max_ranks, name)
        ks = torch.arange(1, kmax + 1)
        params = (ks * (m + n)).to(torch.float64)
        losses = loss.to(torch.float64)[1 : kmax + 1].clone()
        # enforce monotone non-increasing loss in k (numerical noise)
        losses = torch.cummin(losses, 0).values
        if allow_dense is True or (allow_dense is not False and name in allow_dense):
            params = torch.cat([params, params.new_tensor([float(m * n)])])
            losses = torch.cat([losses, losses.new_zeros(1)])
        options[name] = (params, losses)

    def hull(params: torch.Tensor, losses: torch.Tensor) -> list[int]:
        """Indices of the lower convex hull of (params, loss), from the cheapest option up."""
        params, losses = params.tolist(), losses.tolist()
        pts: list[int] = []
        for i in range(len(params)):
            while len(pts) >= 2:
                a, b = pts[-2], pts[-1]
                # drop b if it lies on or above the segment a -> i
                cross = (params[b] - params[a]) * (losses[i] - losses[a]) - (params[i] - params[a]) * (
                    losses[b] - losses[a]
                )
                if cross <= 0:
                    pts.pop()
                else:
                    break
            pts.append(i)
        return pts

    import heapq

    choice = {name: 0 for name in names}
    spent = sum(float(options[n][0][0]) for n in names)
    if spent > budget:
        raise ValueError("allocate_ranks: budget unreachable even at rank 1 everywhere")
    hulls = {name: hull(*options[name]) for name in names}
    position = {name: 0 for name in names}
    heap = []

    def push(name):
        h, p = hulls[name], position[name]
        if p + 1 < len(h):
            params, losses = options[name]
            a, b = h[p], h[p + 1]
            gain = float(losses[a] - losses[b]) / float(params[b] - params[a])
            heapq.heappush(heap, (-gain, name))

    for name in names:
        push(name)
    # greedy along each matrix's convex hull: the best loss drop per parameter first
    while heap:
        _, name = heapq.heappop(heap)
        params = options[name][0]
        nxt = hulls[name][position[name] + 1]
        extra = float(params[nxt] - params[choice[name]])
        if spent + extra > budget:
            continue  # this matrix's next hull step does not fit: leave it where it is
        spent += extra
        choice[name] = nxt
        position[name] += 1
        push(name)
    # greedy fill: single-step increases with the best loss drop per parameter that still fit
    while True:
        best, best_gain = None, 0.0
        for name, i in choice.items():
            params, losses = options[name]
            if i + 1 >= len(params):
                continue
            extra = float(params[i + 1] - params[i])
            if spent + extra > budget:
                continue
            gain = float(losses[i] - losses[i + 1]) / extra
            if best is None or gain > best_gain:
                best, best_gain = name, gain
        if best is None:
            break
        spent += float(options[best][0][choice[best] + 1] - options[best][0][choice[best]])
        choice[best] += 1
    out = {}
    for name, i in choice.items():
        m, n, _ = curves[name]
        kmax = _max_rank(m, n, max_ranks, name)
        out[name] = None if i >= kmax else i + 1
    achieved = 1 - spent / total
    if achieved > reduction + tolerance + 1e-12:
        raise ValueError(f"allocate_ranks: achieved {achieved:.4f}, outside the tolerance of {reduction}")
    return out


def _max_rank(m: int, n: int, max_ranks: dict[str, int] | None, name: str) -> int:
    kmax = breakeven_rank(m, n)
    return kmax if max_ranks is None else min(kmax, max_ranks[name])
