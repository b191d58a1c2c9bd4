"""Fused dense x column-sparse linear: y = D @ (S @ x) + bias, S stored as (values, indices).

Program (t, g) owns a tile of BLOCK_T tokens. For each slice of BLOCK_N input features it
decompresses S^T[n-slice, k-slice] into a dense [BLOCK_N, K_PAD] tile in registers/SRAM (one
compare-and-select per stored non-zero row: s * BLOCK_N * K_PAD work), multiplies it into
h = x_tile @ S^T (fp32, on chip), rounds h to the input dtype, then streams over the output tiles
writing h @ D^T + bias. k wider than the chunk (512) runs as several launches over k-slices that
accumulate into an fp32 workspace; each launch only keeps the non-zeros whose row is in its slice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from .._triton_common import check_launchable, is_interpreted, k_slices, mma, pick_config, store_tile, upcast_for


@triton.jit
def _dense_sparse_fwd_kernel(
    x_ptr,
    val_ptr,
    idx_ptr,
    d_ptr,
    bias_ptr,
    acc_ptr,
    out_ptr,
    T,
    N,
    M,
    K,
    K0,
    S_NNZ,
    sxt,
    sxn,
    svs,
    svn,
    sis,
    sin,
    sdm,
    sdk,
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

    # stage 1: h = x_tile @ S^T over rows K0..K0+K-1 of S, built tile by tile from the compact format
    h = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        xt = tl.load(
            x_ptr + offs_t[:, None] * sxt + offs_n[None, :] * sxn, mask=t_ok[:, None] & n_ok[None, :], other=0.0
        )
        st = tl.zeros([BLOCK_N, K_PAD], dtype=tl.float32)  # dense S^T tile
        for i in range(0, S_NNZ):
            v = tl.load(val_ptr + i * svs + offs_n * svn, mask=n_ok, other=0.0).to(tl.float32)
            r = tl.load(idx_ptr + i * sis + offs_n * sin, mask=n_ok, other=-1).to(tl.int32) - K0
            hit = (r[:, None] == offs_k[None, :]) & k_ok[None, :]
            st = tl.where(hit, v[:, None], st)  # rows are distinct: select, no sum
        h = mma(xt, st.to(x_ptr.dtype.element_ty), h, UPCAST)
    h = h.to(d_ptr.dtype.element_ty)

    # stage 2: y = h @ D[:, slice]^T (+ bias)
    for m0 in range(pid_m * BLOCK_M, M, M_SPLIT * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        dt = tl.load(
            d_ptr + offs_k[:, None] * sdk + offs_m[None, :] * sdm, mask=k_ok[:, None] & m_ok[None, :], other=0.0
        )
        y = mma(h, dt, tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32), UPCAST)
        store_tile(
            y, out_ptr, acc_ptr, bias_ptr, offs_t, offs_m, t_ok, m_ok, sat, sam_acc, sot, som, HAS_BIAS, ACCUMULATE
        )


def forward(
    x: torch.Tensor, D: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [T, n], D [m, k], values/indices [s, n], bias [m] or None -> y [T, m] in x.dtype."""
    kernel = _dense_sparse_fwd_kernel
    check_launchable(kernel, (x, D, values, indices, bias), "dense_sparse_linear")
    T, N = x.shape
    M, K = D.shape
    s = values.shape[0]
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
            values,
            indices,
            D[:, k0:k1],
            bias if bias is not None else out,
            ws,
            dst,
            T,
            N,
            M,
            k1 - k0,
            k0,
            s,
            x.stride(0),
            x.stride(1),
            values.stride(0),
            values.stride(1),
            indices.stride(0),
            indices.stride(1),
            D.stride(0),
            D.stride(1),
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
