"""Backend choice shared by every op (no triton import here).

Rule: the PyTorch reference, on every device. Measured on an H200 (bench/results/kernels.md, 2026-12-04)
the compiled Triton kernels are correct but 5-500x slower than the same maths as cuBLAS products, so
``auto`` does not pick them until a kernel is measured faster. ``COMPRESS_KERNELS=reference|triton``
forces one (``auto`` or unset = the rule). Forcing triton on CPU tensors works only under the Triton
interpreter (``TRITON_INTERPRET=1`` set before triton is imported); the launcher raises a clear error
otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

ENV_VAR = "COMPRESS_KERNELS"
BACKENDS = ("auto", "reference", "triton")

# How often each backend ran, per op: lets tests prove the intended path really ran.
dispatch_counts: collections.Counter[tuple[str, str]] = collections.Counter()

# read-only: a change sets a new merged dict (see below), so the shared default is never mutated
_config_overrides: contextvars.ContextVar[dict] = contextvars.ContextVar("compress_kernels_config", default={})  # noqa: B039


def requested_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {BACKENDS}")
    return value


def choose_backend(*tensors: torch.Tensor | None) -> str:
    """The backend for an op on ``tensors``: the forced one, else the reference (the rule above)."""
    req = requested_backend()
    return "reference" if req == "auto" else req


def record(op: str, backend: str) -> None:
    dispatch_counts[(op, backend)] += 1


def config_overrides() -> dict:
    return _config_overrides.get()


@contextlib.contextmanager
def triton_config(**overrides) -> Iterator[None]:
    """Override launch parameters (block_t, block_n, block_m, k_chunk, m_split, num_warps, num_stages)
    of the Triton launchers inside the block: used by tests and benchmarks to reach every code path."""
    token = _config_overrides.set({**_config_overrides.get(), **overrides})
    try:
        yield
    finally:
        _config_overrides.reset(token)


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Set ``COMPRESS_KERNELS`` inside the block (process-wide: not for concurrent use)."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {BACKENDS}")
    old = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old
