"""Small helpers shared across the package (progress, sizes, atomic folders)."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def progress_iter(items: Iterable, description: str, enabled: bool = True, total: int | None = None) -> Iterator:
    """tqdm progress bar on stderr (quiet when disabled)."""
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=description, total=total, disable=not enabled, leave=False, dynamic_ncols=True))


def require(module: str, extra: str, purpose: str) -> None:
    """A clear error when an optional dependency is missing: which extra to install, and for what."""
    import importlib.util

    from .errors import CompressError

    if importlib.util.find_spec(module) is None:
        raise CompressError(f"{purpose} needs the {module!r} package: pip install 'compress-llm[{extra}]'")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux the high-water mark of its own address space (VmHWM):
    getrusage's ru_maxrss carries over the parent's peak through fork and exec, so a run started by a
    process that once held more (a benchmark that generated a checkpoint first) reported the parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB, macOS bytes


def peak_gpu_bytes() -> int | None:
    """The most GPU memory torch has held at once on any one GPU of this process (None when no GPU was used)."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))


def trim_heap() -> None:
    """Hand the heap's freed pages back to the system; a no-op off glibc. glibc keeps them resident: measured
    on a streamed walk of SmolLM2's 30 layers, the process grew by one freed layer per layer (1.04 GiB; 0.56
    after a trim), each layer's weights pinned in the heap by the activations allocated after them."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# glibc's mallopt parameters: the size from which an allocation gets its own mapping, and the free space at the
# heap's top above which a free hands it back to the system
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
LARGE_ALLOCATION_BYTES = 4 * 2**20
MAX_MAPPING_THRESHOLD = 32 * 2**20  # glibc's ceiling on 64-bit systems (mallopt refuses more)
# the free space the heap's top keeps between trim_heap calls (at every layer's end)
HEAP_TOP_KEPT_BYTES = 64 * 2**20


def map_large_allocations(from_bytes: int = LARGE_ALLOCATION_BYTES) -> None:
    """Give every allocation of ``from_bytes`` (4 MiB by default, at most 32 MiB) or more its own memory mapping,
    returned to the system when freed; a no-op off glibc. By default glibc raises that threshold to the largest
    block freed so far (up to 32 MiB), after which a layer's activations come from the heap and their pages stay
    resident once freed. The price: each large block's pages are mapped afresh (bench/results/heap_mapping.md:
    whitening at 20 % on SmolLM2 peaks at 0.69 GiB against up to 0.81, for about 9 % more time).

    A threshold set by hand also ends glibc's raising of the heap's trim threshold, which stays at 128 KiB: every
    free at the heap's top would hand its pages back and the next allocation fault them in again (lowrank-20 on
    SmolLM2, hidden states on disk: 168 s against 158 s with the top kept, the same peak). The top keeps up to
    64 MiB instead; :func:`trim_heap` hands it back at every layer's end."""
    global _large_allocations_mapped
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, min(from_bytes, MAX_MAPPING_THRESHOLD))
        libc.mallopt(_M_TRIM_THRESHOLD, HEAP_TOP_KEPT_BYTES)
        _large_allocations_mapped = True


_large_allocations_mapped = False


def large_allocations_mapped() -> bool:
    """Whether :func:`map_large_allocations` took effect in this process (the report says so)."""
    return _large_allocations_mapped


# memory is tight when the model's float32 weights are at least this share of the memory available
TIGHT_MEMORY_SHARE = 1 / 8


def map_large_allocations_when_tight(model_bytes: int) -> bool:
    """:func:`map_large_allocations` when memory is tight: the model's float32 bytes are at least
    :data:`TIGHT_MEMORY_SHARE` of the memory available now. Otherwise glibc's heap keeps reusing freed blocks:
    fresh mappings cost their page faults on every large allocation: lowrank-20 on SmolLM2 (0.54 GB against
    24 GB) compresses in 257 s on the heap against 293 s mapped, for a peak of 1.42 against 1.34 GiB
    (bench/results/heap_mapping.md). Returns whether it mapped."""
    import psutil

    tight = model_bytes >= TIGHT_MEMORY_SHARE * psutil.virtual_memory().available
    if tight:
        map_large_allocations()
    return tight


# entries in oneDNN's primitive cache and ideep's computation cache (PyTorch's bf16 matmuls on CPU): 1024 each by
# default, a compiled kernel per matrix shape. Low-rank factors give every module shapes of its own: 100 of them
# on 2048 x 576 inputs held 131 MB by default and 28 MB at 32 entries (tests/core/test_peak_memory.py's case), which
# hold the shapes of one layer's passes (about 20: its dense and low-rank products, forward and backward)
KERNEL_CACHE_ENTRIES = 32


def bound_kernel_caches() -> None:
    """Cap oneDNN's per-shape kernel caches at :data:`KERNEL_CACHE_ENTRIES` (unless the environment sets them).
    Both are read when oneDNN first runs: call it before any bf16 matmul on CPU."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(KERNEL_CACHE_ENTRIES))


@functools.cache
def _libc():
    """glibc, loaded once (None elsewhere: no malloc_trim)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Collect unreachable objects and trim the heap: the next phase's peak should not sit on the last one's
    freed pages."""
    import gc

    gc.collect()
    trim_heap()


class StagedFolder:
    """A folder written into a temporary sibling and renamed to ``final`` when the block ends.

    A failure or Ctrl-C removes the temporary folder, so no half-written output remains, unless
    ``keep()`` was called: from then on the folder holds work worth keeping (a saved checkpoint), and
    it is renamed into place on failure too. An existing ``final`` is replaced only with ``overwrite``.
    """

    def __init__(self, final: Path, overwrite: bool = False, partial: bool = False):
        self.final, self.overwrite, self.partial = Path(final), overwrite, partial
        self.keeping = False
        self.path: Path | None = None

    def keep(self) -> None:
        self.keeping = True

    @staticmethod
    def partial_path(final: Path) -> Path:
        """Where a resumable run stages its folder: a killed run leaves it there for ``--resume``."""
        return Path(final).parent / f".{Path(final).name}.partial"

    def __enter__(self) -> StagedFolder:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if self.partial:  # a fixed name, so that a run killed without cleaning up can be found again
            self.path = self.partial_path(self.final)
            self.path.mkdir(exist_ok=True)
        else:
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and not self.keeping:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        try:
            self._publish()
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        return False

    def _publish(self) -> None:
        if not self.final.exists():
            self.path.rename(self.final)
            return
        if not self.overwrite:
            raise FileExistsError(self.final)
        old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
        self.final.rename(old)
        self.path.rename(self.final)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``final`` only if the block succeeds."""
    with StagedFolder(final, overwrite) as staged:
        yield staged.path
