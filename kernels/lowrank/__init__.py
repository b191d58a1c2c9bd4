"""lowrank_linear(x, A, B, bias=None) = (x @ B^T) @ A^T + bias.

Shapes: x [..., n], B [k, n], A [m, k], bias [m] -> y [..., m] in x.dtype.
"""

from __future__ import annotations

import torch

from .._common import autocast_input, check_same, check_shape, sum_rows
from .._dispatch import choose_backend, record
from .reference import lowrank_linear_ref

OP = "lowrank_linear"


class _LowRankLinearTriton(torch.autograd.Function):
    """Triton forward; backward with PyTorch matmuls in the input dtype (h is recomputed)."""

    @staticmethod
    def forward(ctx, x, A, B, bias):
        from . import triton_impl

        ctx.save_for_backward(x, A, B)
        ctx.has_bias = bias is not None
        return triton_impl.forward(x, A, B, bias)

    @staticmethod
    def backward(ctx, g):
        x, A, B = ctx.saved_tensors
        gx = gA = gB = gbias = None
        need_x, need_A, need_B, need_bias = ctx.needs_input_grad
        if need_x or need_B:
            gh = g @ A  # [T, k]
            if need_x:
                gx = gh @ B  # [T, n]
            if need_B:
                gB = gh.T @ x  # [k, n]
        if need_A:
            gA = g.T @ (x @ B.T)  # [m, k]
        if need_bias and ctx.has_bias:
            gbias = sum_rows(g, g.dtype)
        return gx, gA, gB, gbias


def lowrank_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = (x @ B^T) @ A^T + bias for x [..., n], B [k, n], A [m, k], bias [m] -> [..., m]."""
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"{OP}: A [m, k] and B [k, n] must be 2-D, got {tuple(A.shape)} and {tuple(B.shape)}")
    m, k = A.shape
    n = x.shape[-1]
    check_shape(OP, "B", B, (k, n))
    check_shape(OP, "bias", bias, (m,))
    x = autocast_input(x, A)
    check_same(OP, x, {"A": A, "B": B, "bias": bias})
    backend = choose_backend(x, A, B, bias)
    if min(m, k, n) == 0:
        backend = "reference"
    record(OP, backend)
    if backend == "reference":
        return lowrank_linear_ref(x, A, B, bias)
    y = _LowRankLinearTriton.apply(x.reshape(-1, n), A, B, bias)
    return y.reshape(*x.shape[:-1], m)
