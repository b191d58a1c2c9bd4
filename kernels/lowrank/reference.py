"""Reference (and CPU fallback): y = (x @ B^T) @ A^T + bias, fp32 maths for half inputs."""

from __future__ import annotations

import torch

from .._common import compute_dtype


def lowrank_linear_ref(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    ct = compute_dtype(x)
    y = (x.to(ct) @ B.to(ct).T) @ A.to(ct).T
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)
