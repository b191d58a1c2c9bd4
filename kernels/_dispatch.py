"""Backend choice shared by every op (no triton import here).

Rule: Triton when every tensor is on CUDA and triton imports; the PyTorch reference otherwise.
``COMPRESS_KERNELS=reference|triton`` forces one (``auto`` or unset = the rule). Forcing triton on
CPU tensors works only under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported); the launcher raises a clear error otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import os
import warnings
from collections.abc import Iterator

import torch

ENV_VAR = "COMPRESS_KERNELS"
BACKENDS = ("auto", "reference", "triton")

# How often each backend ran, per op: lets tests prove the intended path really ran.
dispatch_counts: collections.Counter[tuple[str, str]] = collections.Counter()

_triton_ok: bool | None = None
# read-only: a change sets a new merged dict (see below), so the shared default is never mutated
_config_overrides: contextvars.ContextVar[dict] = contextvars.ContextVar("compress_kernels_config", default={})  # noqa: B039


def requested_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {BACKENDS}")
    return value


def triton_importable() -> bool:
    """True when ``import triton`` works. Only a missing triton counts as 'no'; other errors propagate."""
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401

            _triton_ok = True
        except ModuleNotFoundError as err:
            if err.name != "triton":
                raise
            warnings.warn(
                "triton is not installed: compress.kernels uses the PyTorch reference on CUDA",
                RuntimeWarning,
                stacklevel=3,
            )
            _triton_ok = False
    return _triton_ok


def choose_backend(*tensors: torch.Tensor | None) -> str:
    req = requested_backend()
    if req != "auto":
        return req
    present = [t for t in tensors if t is not None]
    if present and all(t.is_cuda for t in present) and triton_importable():
        return "triton"
    return "reference"


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
