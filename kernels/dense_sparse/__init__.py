"""dense_sparse_linear(x, D, values, indices, k, bias=None) = D @ (S @ x) + bias.

S is k x n with a fixed number s of non-zeros per column (see ``compress.kernels.sparse_format``):
values [s, n] float, indices [s, n] int16/int32 (row of each non-zero, distinct per column).
Shapes: x [..., n], D [m, k], bias [m] -> y [..., m] in x.dtype.
Indices outside 0..k-1 are an error in the reference (scatter) and silently dropped by the
Triton kernel: the range is not checked per call (that would cost a device sync).
"""

from __future__ import annotations

import torch

from .._common import autocast_input, check_same, check_shape, sum_rows
from .._dispatch import choose_backend, record
from ..sparse_format import check_colsparse, colsparse_to_dense
from .reference import dense_sparse_linear_ref

OP = "dense_sparse_linear"


class _DenseSparseLinearTriton(torch.autograd.Function):
    """Triton forward; backward with PyTorch ops on a dense copy of S (k x n), h recomputed."""

    @staticmethod
    def forward(ctx, x, D, values, indices, k, bias):
        from . import triton_impl

        ctx.save_for_backward(x, D, values, indices)
        ctx.k = k
        ctx.has_bias = bias is not None
        return triton_impl.forward(x, D, values, indices, bias)

    @staticmethod
    def backward(ctx, g):
        x, D, values, indices = ctx.saved_tensors
        need_x, need_D, need_values, _, _, need_bias = ctx.needs_input_grad
        gx = gD = gvalues = gbias = None
        S = colsparse_to_dense(values, indices, ctx.k)  # [k, n]
        if need_D:
            gD = g.T @ (x @ S.T)  # [m, k]
        if need_x or need_values:
            gh = g @ D  # [T, k]
            if need_x:
                gx = gh @ S  # [T, n]
            if need_values:
                gvalues = (gh.T @ x).gather(0, indices.long())  # dL/dS at the stored positions
        if need_bias and ctx.has_bias:
            gbias = sum_rows(g, g.dtype)
        return gx, gD, gvalues, None, None, gbias


def dense_sparse_linear(
    x: torch.Tensor,
    D: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    k: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = D @ (S @ x) + bias for x [..., n], D [m, k], S given as values/indices [s, n]."""
    if D.dim() != 2:
        raise ValueError(f"{OP}: D must be 2-D [m, k], got {tuple(D.shape)}")
    k = int(k)
    m = D.shape[0]
    n = x.shape[-1]
    check_shape(OP, "D", D, (m, k))
    check_colsparse(values, indices, k)
    check_shape(OP, "values", values, (values.shape[0], n))
    check_shape(OP, "bias", bias, (m,))
    x = autocast_input(x, D)
    check_same(OP, x, {"D": D, "values": values, "bias": bias})
    if indices.device != x.device:
        raise ValueError(f"{OP}: indices are on {indices.device} but x is on {x.device}")
    backend = choose_backend(x, D, values, indices, bias)
    if min(m, k, n) == 0:
        backend = "reference"
    record(OP, backend)
    if backend == "reference":
        return dense_sparse_linear_ref(x, D, values, indices, k, bias)
    y = _DenseSparseLinearTriton.apply(x.reshape(-1, n), D, values, indices, k, bias)
    return y.reshape(*x.shape[:-1], m)
