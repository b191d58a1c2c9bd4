"""Reference (and CPU fallback): y = (x @ V^T) @ U^T + x[..., sc_channels] @ sc_values^T + bias."""

from __future__ import annotations

import torch

from .._common import compute_dtype


def lowrank_sparse_linear_ref(
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    sc_values: torch.Tensor,
    sc_channels: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    ct = compute_dtype(x)
    xc = x.to(ct)
    y = (xc @ V.to(ct).T) @ U.to(ct).T + xc.index_select(-1, sc_channels.long()) @ sc_values.to(ct).T
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)
