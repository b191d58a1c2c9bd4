"""Fused low-rank + channel-sparse linear: y = (x @ V^T) @ U^T + x[:, channels] @ Sv^T + bias.

Program (t, g) owns a tile of BLOCK_T tokens: h = x_tile @ V^T stays on chip as in
``lowrank_linear``; for each of its output tiles it adds h @ U^T and the channel term, gathering
the selected input columns of x in BLOCK_C slices (L1/L2-resident re-reads) against
sc_values^T, all into one fp32 accumulator, then bias, then a single store. Rank wider than the
k-chunk (512) runs as several launches; the channel term and the bias go with the first.
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
def _lowrank_sparse_fwd_kernel(
    x_ptr,
    v_ptr,
    u_ptr,
    sc_ptr,
    ch_ptr,
    bias_ptr,
    acc_ptr,
    out_ptr,
    T,
    N,
    M,
    R,
    C,
    sxt,
    sxn,
    svr,
    svn,
    sum_,
    sur,
    ssm,
    ssc,
    sat,
    sam_acc,
    sot,
    som,
    HAS_SC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    K_PAD: tl.constexpr,
    M_SPLIT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, K_PAD)
    t_ok = offs_t < T
    k_ok = offs_k < R

    # stage 1: h = x_tile @ V^T, [BLOCK_T, K_PAD] on chip
    h = project_tile(x_ptr, v_ptr, offs_t, t_ok, offs_k, k_ok, N, sxt, sxn, svr, svn, BLOCK_T, BLOCK_N, K_PAD, UPCAST)
    h = h.to(u_ptr.dtype.element_ty)

    # stage 2: y = h @ U^T (+ x[:, ch] @ Sv^T) (+ bias)
    for m0 in range(pid_m * BLOCK_M, M, M_SPLIT * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        ut = tl.load(
            u_ptr + offs_k[:, None] * sur + offs_m[None, :] * sum_, mask=k_ok[:, None] & m_ok[None, :], other=0.0
        )
        y = mma(h, ut, tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32), UPCAST)
        if HAS_SC:
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_ok = offs_c < C
                ch = tl.load(ch_ptr + offs_c, mask=c_ok, other=0)
                xg = tl.load(
                    x_ptr + offs_t[:, None] * sxt + ch[None, :] * sxn, mask=t_ok[:, None] & c_ok[None, :], other=0.0
                )
                sv = tl.load(
                    sc_ptr + offs_c[:, None] * ssc + offs_m[None, :] * ssm,
                    mask=c_ok[:, None] & m_ok[None, :],
                    other=0.0,
                )
                y = mma(xg, sv, y, UPCAST)
        store_tile(
            y, out_ptr, acc_ptr, bias_ptr, offs_t, offs_m, t_ok, m_ok, sat, sam_acc, sot, som, HAS_BIAS, ACCUMULATE
        )


def forward(
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    sc_values: torch.Tensor,
    sc_channels: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [T, n], U [m, r], V [r, n], sc_values [m, c], sc_channels [c], bias [m] -> y [T, m]."""
    kernel = _lowrank_sparse_fwd_kernel
    check_launchable(kernel, (x, U, V, sc_values, sc_channels, bias), "lowrank_sparse_linear")
    T, N = x.shape
    M, R = U.shape
    C = sc_channels.shape[0]
    out = new_output((T, M), x.dtype, x.device)
    if T == 0:
        return out
    cfg = pick_config(T, N, M, R, x.device, interpreted=is_interpreted(kernel))
    block_c = max(16, min(64, triton.next_power_of_2(max(C, 1))))
    slices = k_slices(R, cfg.k_chunk)
    ws = out if len(slices) == 1 else new_output((T, M), torch.float32, x.device)
    grid = (triton.cdiv(T, cfg.block_t), cfg.m_split)
    for i, (k0, k1) in enumerate(slices):
        dst = out if i == len(slices) - 1 else ws
        kernel[grid](
            x,
            V[k0:k1],
            U[:, k0:k1],
            sc_values,
            sc_channels,
            bias if bias is not None else out,
            ws,
            dst,
            T,
            N,
            M,
            k1 - k0,
            C,
            x.stride(0),
            x.stride(1),
            V.stride(0),
            V.stride(1),
            U.stride(0),
            U.stride(1),
            sc_values.stride(0),
            sc_values.stride(1),
            ws.stride(0),
            ws.stride(1),
            dst.stride(0),
            dst.stride(1),
            HAS_SC=C > 0 and i == 0,
            HAS_BIAS=bias is not None and i == 0,
            ACCUMULATE=i > 0,
            UPCAST=upcast_for(kernel, x.dtype),
            BLOCK_T=cfg.block_t,
            BLOCK_N=cfg.block_n,
            BLOCK_M=cfg.block_m,
            BLOCK_C=block_c,
            K_PAD=cfg.k_pad,
            M_SPLIT=cfg.m_split,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return out
