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
The best iterate (lowest error) is returned, so the result is never worse than the projected SVD.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DenseSparseFactors:
    D: torch.Tensor            # [m, k]
    S: torch.Tensor            # [k, n] dense, s non-zeros per column
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


def dense_sparse_factorize(W: torch.Tensor, k: int, s: int, iters: int = 40, cg_steps: int = 4,
                           pattern: str = "topk", scale: torch.Tensor | None = None,
                           seed: int = 0) -> DenseSparseFactors:
    """Factor ``W`` [m, n] as D [m, k] @ S [k, n] (s non-zeros per column of S); float32 maths.

    ``scale`` [n] (optional, > 0) weights the error of input channel j by scale[j].
    Returns factors of W itself (the scale is undone), in float32.
    """
    m, n = W.shape
    if not 1 <= s <= k:
        raise ValueError(f"need 1 <= s <= k, got s={s}, k={k}")
    if pattern == "2:4" and (k % 4 or 2 * s != k):
        raise ValueError(f"pattern 2:4 needs k divisible by 4 and s = k/2, got k={k}, s={s}")
    Wf = W.detach().float()
    if scale is not None:
        Wf = Wf * scale.float()[None, :]
    norm = Wf.norm().clamp_min(torch.finfo(torch.float32).tiny)

    U, sig, Vh = torch.linalg.svd(Wf.double(), full_matrices=False)
    energy = sig.pow(2)
    svd_rank = min((m * k + s * n) // (m + n), sig.numel())
    svd_error = float((energy[svd_rank:].sum() / energy.sum().clamp_min(1e-300)).sqrt())
    r0 = min(k, sig.numel())
    device = Wf.device
    D = torch.zeros(m, k, device=device)
    S = torch.zeros(k, n, device=device)
    D[:, :r0] = U[:, :r0].float()
    S[:r0] = (sig[:r0, None] * Vh[:r0]).float()
    if k > r0:  # over-complete dictionary: random unit atoms, unused until a column picks them
        gen = torch.Generator().manual_seed(seed)
        extra = torch.randn(m, k - r0, generator=gen).to(device)
        D[:, r0:] = extra / extra.norm(dim=0)
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
        norms = D.norm(dim=0)
        dead = (norms < 1e-8) | (S.abs().sum(1) == 0)
        if bool(dead.any()):  # re-seed unused atoms with the worst-fitted columns' residuals
            residual = Wf - D @ S
            worst = residual.norm(dim=0).topk(int(dead.sum())).indices
            D[:, dead] = residual[:, worst]
            S[dead] = 0
            norms = D.norm(dim=0)
        norms = norms.clamp_min(1e-12)
        D = D / norms
        S = S * norms[:, None]
        errors.append(error(D, S))
        if errors[-1] < best[0]:
            best = (errors[-1], D, S)
    _, D, S = best
    if scale is not None:
        S = S / scale.float()[None, :]
    return DenseSparseFactors(D, S, errors, svd_error)
