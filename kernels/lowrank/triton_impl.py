"""Fused low-rank linear: y = (x @ B^T) @ A^T + bias, the [tokens, k] intermediate kept on chip.

Program (t, g) owns a tile of BLOCK_T tokens. It computes h = x_tile @ B^T ([BLOCK_T, K_PAD],
fp32 in registers, looping over n), rounds h to the input dtype (as an unfused half-precision
pair of matmuls would), then streams over output tiles m = g, g + M_SPLIT, ... writing
h @ A^T + bias. Rank wider than the k-chunk (512) runs as several launches over k-slices that
accumulate into an fp32 workspace; the last one writes the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from .._triton_common import (
    check_launchable,
    is_interpreted,
    k_slices,
    mma,
    pick_config,
    project_tile,
    store_tile,
    upcast_for,
)


@triton.jit
def _lowrank_fwd_kernel(
    x_ptr,
    b_ptr,
    a_ptr,
    bias_ptr,
    acc_ptr,
    out_ptr,
    T,
    N,
    M,
    K,
    sxt,
    sxn,
    sbk,
    sbn,
    sam,
    sak,
    sat,
    sam_acc,
    sot,
    som,
    HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    K_PAD: tl.constexpr,
    M_SPLIT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, K_PAD)
    t_ok = offs_t < T
    k_ok = offs_k < K

    # stage 1: h = x_tile @ B^T, [BLOCK_T, K_PAD], stays in registers
    h = project_tile(x_ptr, b_ptr, offs_t, t_ok, offs_k, k_ok, N, sxt, sxn, sbk, sbn, BLOCK_T, BLOCK_N, K_PAD, UPCAST)
    h = h.to(a_ptr.dtype.element_ty)

    # stage 2: y = h @ A^T (+ bias), streamed over this program's output tiles
    for m0 in range(pid_m * BLOCK_M, M, M_SPLIT * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        at = tl.load(
            a_ptr + offs_k[:, None] * sak + offs_m[None, :] * sam, mask=k_ok[:, None] & m_ok[None, :], other=0.0
        )
        y = mma(h, at, tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32), UPCAST)
        store_tile(
            y, out_ptr, acc_ptr, bias_ptr, offs_t, offs_m, t_ok, m_ok, sat, sam_acc, sot, som, HAS_BIAS, ACCUMULATE
        )


def forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, n], B [k, n], A [m, k], bias [m] or None -> y [T, m] in x.dtype (any strides)."""
    kernel = _lowrank_fwd_kernel
    check_launchable(kernel, (x, A, B, bias), "lowrank_linear")
    T, N = x.shape
    M, K = A.shape
    out = new_output((T, M), x.dtype, x.device)
    if T == 0:
        return out
    cfg = pick_config(T, N, M, K, x.device, interpreted=is_interpreted(kernel))
    slices = k_slices(K, cfg.k_chunk)
    ws = out if len(slices) == 1 else new_output((T, M), torch.float32, x.device)
    grid = (triton.cdiv(T, cfg.block_t), cfg.m_split)
    for i, (k0, k1) in enumerate(slices):
        dst = out if i == len(slices) - 1 else ws
        kernel[grid](
            x,
            B[k0:k1],
            A[:, k0:k1],
            bias if bias is not None else out,
            ws,
            dst,
            T,
            N,
            M,
            k1 - k0,
            x.stride(0),
            x.stride(1),
            B.stride(0),
            B.stride(1),
            A.stride(0),
            A.stride(1),
            ws.stride(0),
            ws.stride(1),
            dst.stride(0),
            dst.stride(1),
            HAS_BIAS=bias is not None and i == 0,
            ACCUMULATE=i > 0,
            UPCAST=upcast_for(kernel, x.dtype),
            BLOCK_T=cfg.block_t,
            BLOCK_N=cfg.block_n,
            BLOCK_M=cfg.block_m,
            K_PAD=cfg.k_pad,
            M_SPLIT=cfg.m_split,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return out
