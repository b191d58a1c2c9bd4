"""Shared low-rank maths: parameter accounting and truncated-SVD factors."""
from __future__ import annotations

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
