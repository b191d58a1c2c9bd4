"""The maths of OFA's factorisation: a (row-weighted) truncated SVD of the embedding table.

E (V x D) ~= C P with coordinates C = W^-1 U_k S_k (V x k) and primitives P = V_k^T (k x D),
where W E = U S V^T and W = diag(w). With w = 1 this is OFA's plain SVD; with
w = sqrt(token count + 1) the error budget goes to the tokens that actually occur.
Why S_k sits in the coordinates (OFA puts it in the primitives): the product is the same, but
coordinates then have the scale of the embedding rows (U_k's entries are ~1/sqrt(V), 20x
smaller for a 262k vocabulary), so AdamW at a fine-tuning learning rate does not wreck them.
The SVD is taken through the small Gram matrix (D x D, or V x V when V < D) in float64: for a
262k-row table that is one matrix product and a 640 x 640 eigendecomposition, not a tall SVD.
"""

from __future__ import annotations

import math

import torch

from ...errors import CompressError


def factorized_params(vocab: int, width: int, dim: int, full: int = 0) -> int:
    """N full rows of D plus k(V - N + D) for the factorised tail."""
    return full * width + dim * (vocab - full + width)


def dim_for_reduction(vocab: int, width: int, reduction: float, full: int = 0) -> int:
    """Largest k that removes at least ``reduction`` of the V*D parameters (next to ``full`` full rows)."""
    return math.floor(((1 - reduction) * vocab * width - full * width) / (vocab - full + width))


def check_dim(vocab: int, width: int, dim: int, where: str = "ofa_embedding", full: int = 0) -> None:
    """k must be >= 1 and save parameters: N D + k(V - N + D) < V D (the measurement protocol in the README)."""
    largest = ((vocab - full) * width - 1) // (vocab - full + width)
    if not 1 <= dim <= largest:
        kept = f" next to {full} full rows" if full else ""
        raise CompressError(
            f"{where}: k={dim} out of range for a {vocab}x{width} embedding{kept} "
            f"(1..{largest}; larger k would not save parameters)"
        )


def frequency_weights(counts: torch.Tensor) -> torch.Tensor:
    return (counts + 1).sqrt()


def factorize_embedding(
    weight: torch.Tensor, dim: int, row_weights: torch.Tensor | None = None, column_cov: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(coords V x k, primitives k x D), float64, minimising ||diag(w) (E - coords @ primitives) L||_F.

    Without ``column_cov`` L = I and the primitives have orthonormal rows. With it (the covariance
    Sigma = L L^T of the hidden states h that meet the rows in a tied head), the error is measured
    in logits, E_h ||(E - C P) h||^2: SVD-LLM's whitening applied to the table, P = V_k^T L^-1."""
    if column_cov is not None:
        from ...lowrank_math import damped_cholesky

        L, _ = damped_cholesky(column_cov.to(torch.float64))
        coords, whitened = factorize_embedding(weight.detach().to(torch.float64) @ L, dim, row_weights)
        primitives = torch.linalg.solve_triangular(L.to(whitened.device), whitened, upper=False, left=False)
        return coords, primitives
    E = weight.detach().to(torch.float64)
    vocab, width = E.shape
    if not 1 <= dim <= min(vocab, width):
        raise CompressError(f"k={dim} out of range for a {vocab}x{width} embedding")
    w = (
        torch.ones(vocab, dtype=torch.float64, device=E.device)
        if row_weights is None
        else row_weights.to(device=E.device, dtype=torch.float64)
    )
    if w.shape != (vocab,) or not bool((w > 0).all()):
        raise CompressError(f"row weights must be {vocab} positive numbers")
    Ew = E * w[:, None]
    if vocab >= width:
        _, evecs = torch.linalg.eigh(Ew.T @ Ew)  # ascending
        primitives = evecs[:, -dim:].flip(1).T  # V_k^T
        scaled = Ew @ primitives.T  # U_k S_k
    else:
        evals, evecs = torch.linalg.eigh(Ew @ Ew.T)
        u = evecs[:, -dim:].flip(1)  # U_k
        singular = evals[-dim:].flip(0).clamp_min(0).sqrt()
        scaled = u * singular  # U_k S_k
        safe = torch.where(singular > 0, singular, torch.ones_like(singular))
        primitives = torch.where(singular[:, None] > 0, (u.T @ Ew) / safe[:, None], torch.zeros_like(E[:dim]))
    # a deterministic sign per component: each primitive's largest-magnitude entry is positive
    signs = torch.sign(primitives.gather(1, primitives.abs().argmax(1, keepdim=True))).squeeze(1)
    signs[signs == 0] = 1
    return scaled * signs / w[:, None], primitives * signs[:, None]


def relative_error(
    weight: torch.Tensor,
    coords: torch.Tensor,
    primitives: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    chunk: int = 32768,
) -> float:
    """||diag(w)(E - C P)||_F / ||diag(w) E||_F, in row chunks (the dense table is never doubled).
    With ``rows``, C approximates only E[rows]; the other rows are kept exactly (zero error)."""
    w_all = (
        torch.ones(weight.shape[0], dtype=torch.float64)
        if row_weights is None
        else row_weights.detach().to(torch.float64).cpu()
    )
    rows = torch.arange(weight.shape[0]) if rows is None else rows.cpu()
    err = 0.0
    for start in range(0, rows.numel(), chunk):
        index = rows[start : start + chunk]
        E = weight.index_select(0, index.to(weight.device)).detach().to(torch.float64)
        R = (E - coords[start : start + chunk].to(torch.float64) @ primitives.to(torch.float64)).cpu()
        err += float((R * w_all[index][:, None]).pow(2).sum())
    ref = 0.0
    for start in range(0, weight.shape[0], chunk):
        E = weight[start : start + chunk].detach().to(torch.float64).cpu()
        ref += float((E * w_all[start : start + chunk][:, None]).pow(2).sum())
    return math.sqrt(err / ref) if ref > 0 else 0.0
