"""Small helpers shared by the ops' dispatch code (no triton import)."""

from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The reference's maths dtype: x's own, except half types off CUDA, which run in fp32. On CUDA the half
    products accumulate in fp32 inside cuBLAS anyway, and upcasting the weights first made the reference 4-14x
    slower than the same products in bf16 (bench/results/kernels.md, H200: '2 x cuBLAS' against 'reference')."""
    half = x.dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if half and not x.is_cuda else x.dtype


def autocast_input(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x in ``like``'s dtype while torch.autocast is on for x's device. Autocast hands a module half-precision
    inputs beside its full-precision weights (e.g. calibration passes in bf16); the products' dtype is then
    autocast's to choose: the reference's matmuls are autocast ops, as nn.Linear's are."""
    if x.dtype != like.dtype and torch.is_autocast_enabled(x.device.type):
        return x.to(like.dtype)
    return x


def check_same(op: str, x: torch.Tensor, named: dict[str, torch.Tensor | None]) -> None:
    """Every float tensor must share x's dtype and device."""
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be floating point, got {x.dtype}")
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def check_shape(op: str, name: str, t: torch.Tensor | None, shape: tuple) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def sum_rows(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return g.sum(0, dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype).to(dtype)
