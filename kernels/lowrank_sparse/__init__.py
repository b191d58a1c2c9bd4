"""lowrank_sparse_linear(x, U, V, sc_values, sc_channels, bias=None) = U (V x) + S_c x + bias.

LOST-style channel-wise sparse term: S_c keeps whole input channels ``sc_channels`` (int32/int64
[c], sorted, distinct) with dense weights ``sc_values`` [m, c], i.e. S_c x = sc_values @ x[..., sc_channels].
Shapes: x [..., n], U [m, r], V [r, n], bias [m] -> y [..., m] in x.dtype. c may be 0.
"""

from __future__ import annotations

import torch

from .._common import autocast_input, check_same, check_shape, sum_rows
from .._dispatch import choose_backend, record
from .reference import lowrank_sparse_linear_ref

OP = "lowrank_sparse_linear"


class _LowRankSparseLinearTriton(torch.autograd.Function):
    """Triton forward; backward with PyTorch matmuls in the input dtype (h recomputed)."""

    @staticmethod
    def forward(ctx, x, U, V, sc_values, sc_channels, bias):
        from . import triton_impl

        ctx.save_for_backward(x, U, V, sc_values, sc_channels)
        ctx.has_bias = bias is not None
        return triton_impl.forward(x, U, V, sc_values, sc_channels, bias)

    @staticmethod
    def backward(ctx, g):
        x, U, V, sc_values, sc_channels = ctx.saved_tensors
        need_x, need_U, need_V, need_sc, _, need_bias = ctx.needs_input_grad
        gx = gU = gV = gsc = gbias = None
        ch = sc_channels.long()
        if need_U:
            gU = g.T @ (x @ V.T)  # [m, r]
        if need_x or need_V:
            gh = g @ U  # [T, r]
            if need_V:
                gV = gh.T @ x  # [r, n]
            if need_x:
                gx = (gh @ V).index_add_(1, ch, g @ sc_values)  # [T, n]
        if need_sc:
            gsc = g.T @ x.index_select(1, ch)  # [m, c]
        if need_bias and ctx.has_bias:
            gbias = sum_rows(g, g.dtype)
        return gx, gU, gV, gsc, None, gbias


def lowrank_sparse_linear(
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    sc_values: torch.Tensor,
    sc_channels: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = (x @ V^T) @ U^T + x[..., sc_channels] @ sc_values^T + bias; x [..., n] -> y [..., m]."""
    if U.dim() != 2 or V.dim() != 2 or sc_values.dim() != 2 or sc_channels.dim() != 1:
        raise ValueError(
            f"{OP}: need U [m, r], V [r, n], sc_values [m, c], sc_channels [c]; got "
            f"{tuple(U.shape)}, {tuple(V.shape)}, {tuple(sc_values.shape)}, {tuple(sc_channels.shape)}"
        )
    m, r = U.shape
    n = x.shape[-1]
    c = sc_channels.shape[0]
    check_shape(OP, "V", V, (r, n))
    check_shape(OP, "sc_values", sc_values, (m, c))
    check_shape(OP, "bias", bias, (m,))
    x = autocast_input(x, U)
    check_same(OP, x, {"U": U, "V": V, "sc_values": sc_values, "bias": bias})
    if sc_channels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{OP}: sc_channels must be int32 or int64, got {sc_channels.dtype}")
    if sc_channels.device != x.device:
        raise ValueError(f"{OP}: sc_channels is on {sc_channels.device} but x is on {x.device}")
    backend = choose_backend(x, U, V, sc_values, sc_channels, bias)
    if min(m, r, n) == 0:
        backend = "reference"
    record(OP, backend)
    if backend == "reference":
        return lowrank_sparse_linear_ref(x, U, V, sc_values, sc_channels, bias)
    y = _LowRankSparseLinearTriton.apply(x.reshape(-1, n), U, V, sc_values, sc_channels, bias)
    return y.reshape(*x.shape[:-1], m)
