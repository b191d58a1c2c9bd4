"""Reference (and CPU fallback): y = (x @ S^T) @ D^T + bias with S = colsparse_to_dense(values, indices, k)."""

from __future__ import annotations

import torch

from .._common import compute_dtype
from ..sparse_format import colsparse_to_dense


def dense_sparse_linear_ref(
    x: torch.Tensor,
    D: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    k: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    ct = compute_dtype(x)
    S = colsparse_to_dense(values.to(ct), indices, k)  # [k, n]
    y = (x.to(ct) @ S.T) @ D.to(ct).T
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)
