"""Output allocation for the Triton launchers.

With poisoning on (``COMPRESS_KERNELS_POISON=1`` or inside ``poison_outputs()``), outputs and
workspaces start as NaN instead of uninitialised memory, so an element a kernel forgot to write
shows up in the tests instead of passing by luck.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

POISON_ENV = "COMPRESS_KERNELS_POISON"
_poison: bool | None = None


def poison_enabled() -> bool:
    if _poison is not None:
        return _poison
    return os.environ.get(POISON_ENV, "0") == "1"


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    global _poison
    old, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = old


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if poison_enabled():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
