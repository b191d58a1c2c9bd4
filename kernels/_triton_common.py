"""Shared pieces of the Triton launchers. Importing this module imports triton.

Only the ops' ``triton_impl`` modules import it, on first Triton dispatch.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ._dispatch import config_overrides

MAX_K_CHUNK = 512  # widest k-slice whose [BLOCK_T, K] intermediate a program keeps in registers


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation and IEEE fp32 products (no TF32).

    UPCAST converts bf16 operands to fp32 first: the Triton interpreter (3.x) multiplies
    bf16 tiles as raw uint16 bits, so the launchers set it when interpreting. The maths is the
    same: a bf16 x bf16 product is exact in fp32 and the tensor cores accumulate in fp32.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def project_tile(
    x_ptr,
    w_ptr,
    offs_t,
    t_ok,
    offs_k,
    k_ok,
    N,
    sxt,
    sxn,
    swk,
    swn,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Stage 1 of the fused low-rank kernels: h = x_tile @ W^T for a dense W [K, N], fp32 [BLOCK_T, K_PAD]."""
    h = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        xt = tl.load(
            x_ptr + offs_t[:, None] * sxt + offs_n[None, :] * sxn, mask=t_ok[:, None] & n_ok[None, :], other=0.0
        )
        wt = tl.load(
            w_ptr + offs_n[:, None] * swn + offs_k[None, :] * swk, mask=n_ok[:, None] & k_ok[None, :], other=0.0
        )
        h = mma(xt, wt, h, UPCAST)
    return h


@triton.jit
def store_tile(
    y,
    out_ptr,
    acc_ptr,
    bias_ptr,
    offs_t,
    offs_m,
    t_ok,
    m_ok,
    sat,
    sam_acc,
    sot,
    som,
    HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """Epilogue of the fused kernels: add the fp32 workspace of earlier k-slices and the bias, store."""
    out_mask = t_ok[:, None] & m_ok[None, :]
    if ACCUMULATE:
        y += tl.load(acc_ptr + offs_t[:, None] * sat + offs_m[None, :] * sam_acc, mask=out_mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_t[:, None] * sot + offs_m[None, :] * som, y.to(out_ptr.dtype.element_ty), mask=out_mask)


def is_interpreted(kernel) -> bool:
    return isinstance(kernel, InterpretedFunction)


def check_launchable(kernel, tensors, op: str) -> None:
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = present[0].device
    if device.type != "cuda" and not is_interpreted(kernel):
        raise RuntimeError(
            f"{op}: the Triton backend got {device.type} tensors; set TRITON_INTERPRET=1 before triton is "
            "imported to run it on the CPU, or use COMPRESS_KERNELS=reference"
        )


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block_t: int
    block_n: int
    block_m: int
    k_chunk: int
    m_split: int
    num_warps: int
    num_stages: int

    @property
    def k_pad(self) -> int:
        return max(16, triton.next_power_of_2(self.k_chunk))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def pick_config(T: int, N: int, M: int, K: int, device: torch.device, interpreted: bool) -> LaunchConfig:
    """Heuristic launch parameters, then any ``triton_config(...)`` overrides.

    T tokens, N input features, M outputs, K the width of the on-chip intermediate.
    """
    over = dict(config_overrides())
    unknown = set(over) - {f.name for f in dataclasses.fields(LaunchConfig)}
    if unknown:
        raise ValueError(f"unknown triton_config keys {sorted(unknown)}")
    n_chunks = triton.cdiv(max(K, 1), over.get("k_chunk", MAX_K_CHUNK))
    k_chunk = over.pop("k_chunk", triton.cdiv(triton.cdiv(K, n_chunks), 16) * 16)
    k_pad = max(16, triton.next_power_of_2(k_chunk))
    if interpreted:  # big tiles = fewer numpy calls; the interpreter has no registers to spare
        block_t = 16 if T <= 16 else 32
        block_n, block_m, num_warps = 64, 64, 4
        n_programs_target = 1
    else:
        block_t = 16 if T <= 16 else (64 if k_pad <= 256 else 32)
        block_n = 64 if k_pad <= 128 else 32
        block_m = 64 if k_pad <= 256 else 32
        num_warps = 8 if block_t * k_pad >= 8192 else 4
        n_programs_target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    block_t = over.pop("block_t", block_t)
    block_n = over.pop("block_n", block_n)
    block_m = over.pop("block_m", block_m)
    t_tiles, m_tiles = triton.cdiv(T, block_t), triton.cdiv(M, block_m)
    # Few token tiles (decode): split the outputs over more programs; each recomputes its h tile.
    m_split = min(m_tiles, max(1, triton.cdiv(n_programs_target, t_tiles)))
    cfg = dict(
        block_t=block_t,
        block_n=block_n,
        block_m=block_m,
        k_chunk=k_chunk,
        m_split=over.pop("m_split", m_split),
        num_warps=over.pop("num_warps", num_warps),
        num_stages=over.pop("num_stages", 2),
    )
    for name in ("block_t", "block_n", "block_m"):
        if cfg[name] < 16 or cfg[name] & (cfg[name] - 1):
            raise ValueError(f"{name}={cfg[name]} must be a power of two >= 16 (tl.dot)")
    if cfg["k_chunk"] < 1 or cfg["m_split"] < 1:
        raise ValueError(f"k_chunk and m_split must be >= 1, got {cfg}")
    return LaunchConfig(**cfg)


def k_slices(K: int, k_chunk: int) -> list[tuple[int, int]]:
    return [(k0, min(K, k0 + k_chunk)) for k0 in range(0, K, k_chunk)]


def upcast_for(kernel, dtype: torch.dtype) -> bool:
    return is_interpreted(kernel) and dtype == torch.bfloat16
