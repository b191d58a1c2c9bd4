"""One-shot DSFormer initialisation: W ~= D S with s non-zeros in every column of S.

Alternating minimisation of ||(W - D S) diag(a)||_F (a = per-input-channel scale, ones when
data-free), started from the truncated SVD:

* S-step: one iterative-hard-thresholding step (gradient step with step 1/||D^T D||_2, then keep
  the s largest entries of every column: a fixed support size per column), followed by a few
  column-wise conjugate-gradient steps on the chosen support (hard-thresholding pursuit);
* D-step: exact least squares D = W S^T (S S^T)^-1;
* atoms are renormalised to unit norm after each D-step (the scale moves into S), so that the
  per-column top-s choice compares coefficients in one unit; atoms no column uses are re-seeded
  with the worst-approximated column's residual (the K-SVD trick).

Column scaling by a > 0 keeps every column's support, so S diag(1/a) is the factor of W.
With a full input covariance C (``cov``, "whitening") the objective is tr((W - D S) C (W - D S)^T):
the start is the SVD of W L (C = L L^T) mapped back by L^-1, the IHT gradient is D^T (D S - W) C,
CG runs on the support of all columns jointly (C couples them) and the D-step is
D = W C S^T (S C S^T)^-1.
The best iterate (lowest error) is returned, so the result is never worse than the projected SVD.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...lowrank_math import positive_cholesky


@dataclass
class DenseSparseFactors:
    D: torch.Tensor  # [m, k]
    S: torch.Tensor  # [k, n] dense, s non-zeros per column
    errors: list[float] = field(default_factory=list)  # relative (scaled) error per iteration, [0] = init
    svd_error: float = float("nan")  # truncated SVD with the same number of values (m k + s n), for reference

    @property
    def initial_error(self) -> float:
        return self.errors[0]

    @property
    def final_error(self) -> float:
        return min(self.errors)


def project_columns(S: torch.Tensor, s: int, pattern: str = "topk") -> torch.Tensor:
    """Keep the s largest-magnitude entries of every column (``pattern='2:4'``: 2 of every 4 rows)."""
    k, n = S.shape
    if pattern == "2:4":
        grouped = S.abs().reshape(k // 4, 4, n)
        keep = torch.zeros_like(grouped, dtype=torch.bool).scatter_(1, grouped.topk(2, dim=1).indices, True)
        return S * keep.reshape(k, n)
    idx = S.abs().topk(s, dim=0).indices
    return torch.zeros_like(S).scatter_(0, idx, S.gather(0, idx))


def _largest_eigenvalue(G: torch.Tensor, iters: int = 30) -> float:
    """Power iteration on a PSD matrix (LAPACK's norm-2 is a full SVD: far slower here)."""
    v = torch.ones(G.shape[0], 1, dtype=G.dtype, device=G.device) / G.shape[0] ** 0.5
    for _ in range(iters):
        w = G @ v
        v = w / w.norm().clamp_min(torch.finfo(G.dtype).tiny)
    return float((v.T @ G @ v).item()) * 1.01  # slight overestimate keeps the step safe


def _cg_on_support(G: torch.Tensor, B: torch.Tensor, X: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """A few conjugate-gradient steps per column of min ||W - D X|| with X's support fixed to ``mask``."""
    R = (B - G @ X) * mask
    P = R.clone()
    rs = (R * R).sum(0)
    tiny = torch.finfo(X.dtype).tiny
    for _ in range(steps):
        AP = (G @ P) * mask
        alpha = rs / (P * AP).sum(0).clamp_min(tiny)
        X = X + alpha * P
        R = R - alpha * AP
        rs_new = (R * R).sum(0)
        P = R + (rs_new / rs.clamp_min(tiny)) * P
        rs = rs_new
    return X


def _cg_on_support_coupled(
    G: torch.Tensor, C: torch.Tensor, B: torch.Tensor, X: torch.Tensor, mask: torch.Tensor, steps: int
) -> torch.Tensor:
    """CG on min 1/2 tr(X^T G X C) - tr(X^T B) over X supported on ``mask`` (all columns jointly)."""
    R = (B - G @ X @ C) * mask
    P = R.clone()
    rs = float((R * R).sum())
    for _ in range(steps):
        if rs <= 1e-30:
            break
        AP = (G @ P @ C) * mask
        alpha = rs / max(float((P * AP).sum()), 1e-30)
        X = X + alpha * P
        R = R - alpha * AP
        rs_new = float((R * R).sum())
        P = R + (rs_new / rs) * P
        rs = rs_new
    return X


def _init_dictionary(Wt: torch.Tensor, k: int, seed: int):
    """D [m, k] (unit columns) and coefficients [k, n] from the SVD of Wt (random extra atoms if k > rank)."""
    m, n = Wt.shape
    U, sig, Vh = torch.linalg.svd(Wt.double(), full_matrices=False)
    r0 = min(k, sig.numel())
    device = Wt.device
    D = torch.zeros(m, k, device=device)
    S = torch.zeros(k, n, device=device)
    D[:, :r0] = U[:, :r0].float()
    S[:r0] = (sig[:r0, None] * Vh[:r0]).float()
    if k > r0:  # over-complete dictionary: random unit atoms, unused until a column picks them
        gen = torch.Generator().manual_seed(seed)
        extra = torch.randn(m, k - r0, generator=gen).to(device)
        D[:, r0:] = extra / extra.norm(dim=0)
    return D, S, sig


def _svd_error(sig: torch.Tensor, m: int, n: int, k: int, s: int) -> float:
    energy = sig.pow(2)
    svd_rank = min((m * k + s * n) // (m + n), sig.numel())
    return float((energy[svd_rank:].sum() / energy.sum().clamp_min(1e-300)).sqrt())


def _reseed_and_normalise(D, S, residual_fn):
    norms = D.norm(dim=0)
    dead = (norms < 1e-8) | (S.abs().sum(1) == 0)
    if bool(dead.any()):  # re-seed unused atoms with the worst-fitted columns' residuals
        D, S = D.clone(), S.clone()
        residual = residual_fn(D, S)
        worst = residual.norm(dim=0).topk(int(dead.sum())).indices
        D[:, dead] = residual[:, worst]
        S[dead] = 0
        norms = D.norm(dim=0)
    norms = norms.clamp_min(1e-12)
    return D / norms, S * norms[:, None]


def _factorize_whitened(W, k, s, cov, iters, cg_steps, pattern, seed) -> DenseSparseFactors:
    m, n = W.shape
    # Jacobi preconditioning: with a = sqrt(diag C), (W - D S) C (W - D S)^T equals the same form in
    # W a, S a and the correlation matrix C / (a a^T); the per-column support is unchanged by a.
    C64 = cov.to(device=W.device, dtype=torch.float64)
    a64 = C64.diagonal().clamp_min(1e-30).sqrt()
    C64 = C64 / (a64[:, None] * a64[None, :])
    a = a64.float()
    Wf = W.detach().float() * a[None, :]
    L64 = positive_cholesky(C64)
    C, L = C64.float(), L64.float()
    WL = Wf @ L
    total = WL.pow(2).sum().clamp_min(1e-30)
    D, Sw, sig = _init_dictionary(WL, k, seed)
    # whitened coefficients -> coefficients of x: S L = Sw  =>  S = Sw L^-1
    S = torch.linalg.solve_triangular(L64, Sw.double(), upper=False, left=False).float()
    S = project_columns(S, s, pattern)
    WC = Wf @ C
    c_max = _largest_eigenvalue(C)

    def residual_w(D, S):
        return (Wf - D @ S) @ L

    def error(D, S):
        return float((residual_w(D, S).pow(2).sum() / total).sqrt())

    errors = [error(D, S)]
    best = (errors[0], D, S)
    eye = torch.eye(k, device=Wf.device)
    for _ in range(iters):
        G = D.T @ D
        B = D.T @ WC
        step = 1.0 / max(_largest_eigenvalue(G) * c_max, 1e-12)
        S = project_columns(S - step * (G @ S @ C - B), s, pattern)
        if cg_steps:
            S = _cg_on_support_coupled(G, C, B, S, S != 0, cg_steps)
        SC = S @ C
        gram = SC @ S.T
        ridge = 1e-6 * gram.diagonal().mean().clamp_min(1e-12)
        chol, info = torch.linalg.cholesky_ex(gram + ridge * eye)
        if int(info) == 0:
            D = torch.cholesky_solve((WC @ S.T).T, chol).T
        D, S = _reseed_and_normalise(D, S, residual_w)
        errors.append(error(D, S))
        if errors[-1] < best[0]:
            best = (errors[-1], D, S)
    _, D, S = best
    return DenseSparseFactors(D, S / a[None, :], errors, _svd_error(sig, m, n, k, s))


def dense_sparse_factorize(
    W: torch.Tensor,
    k: int,
    s: int,
    iters: int = 40,
    cg_steps: int = 4,
    pattern: str = "topk",
    scale: torch.Tensor | None = None,
    seed: int = 0,
    cov: torch.Tensor | None = None,
) -> DenseSparseFactors:
    """Factor ``W`` [m, n] as D [m, k] @ S [k, n] (s non-zeros per column of S); float32 maths.

    ``scale`` [n] (optional, > 0) weights the error of input channel j by scale[j]; ``cov`` [n, n]
    (optional, positive definite, e.g. from ``lowrank_math.shrink``) weights it by the full input
    covariance. Returns factors of W itself, in float32; errors are relative in the weighted norm.
    """
    m, n = W.shape
    if not 1 <= s <= k:
        raise ValueError(f"need 1 <= s <= k, got s={s}, k={k}")
    if pattern == "2:4" and (k % 4 or 2 * s != k):
        raise ValueError(f"pattern 2:4 needs k divisible by 4 and s = k/2, got k={k}, s={s}")
    if scale is not None and cov is not None:
        raise ValueError("give at most one of scale and cov")
    if cov is not None:
        return _factorize_whitened(W, k, s, cov, iters, cg_steps, pattern, seed)
    Wf = W.detach().float()
    if scale is not None:
        Wf = Wf * scale.float()[None, :]
    norm = Wf.norm().clamp_min(torch.finfo(torch.float32).tiny)

    D, S, sig = _init_dictionary(Wf, k, seed)
    svd_error = _svd_error(sig, m, n, k, s)
    device = Wf.device
    S = project_columns(S, s, pattern)

    def error(D, S):
        return float(((Wf - D @ S).norm() / norm).item())

    errors = [error(D, S)]
    best = (errors[0], D, S)
    eye = torch.eye(k, device=device)
    for _ in range(iters):
        # S-step: IHT step, projection, CG refinement on the support
        G = D.T @ D
        B = D.T @ Wf
        step = 1.0 / max(_largest_eigenvalue(G), 1e-12)
        S = project_columns(S + step * (B - G @ S), s, pattern)
        if cg_steps:
            S = _cg_on_support(G, B, S, S != 0, cg_steps)
        # D-step: least squares, then unit-norm atoms
        gram = S @ S.T
        ridge = 1e-6 * gram.diagonal().mean().clamp_min(1e-12)
        chol, info = torch.linalg.cholesky_ex(gram + ridge * eye)
        if int(info) == 0:
            D = torch.cholesky_solve((Wf @ S.T).T, chol).T
        D, S = _reseed_and_normalise(D, S, lambda D, S: Wf - D @ S)
        errors.append(error(D, S))
        if errors[-1] < best[0]:
            best = (errors[-1], D, S)
    _, D, S = best
    if scale is not None:
        S = S / scale.float()[None, :]
    return DenseSparseFactors(D, S, errors, svd_error)
