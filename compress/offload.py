"""Where the calibration walk holds its hidden states: on the compute device, in CPU memory or in files.

The layer walk keeps data the size of a calibration stream (tokens x hidden width): each stream's hidden states
per batch (the current and dense streams, a variant's), a layer's dense outputs, the inputs a sub-layer pass
keeps and the block outputs it records. At 64 x 512 tokens that is 75 MB per list at SmolLM2's width, and the
sub-layer walk holds several at once; at 512 x 2048 tokens and Llama-70B's width one list is 17 GB in bf16:
more than a GPU holds beside its layer. :class:`Activations` makes those lists: plain lists on the device, or
lists whose items live in CPU memory or in files of a temporary folder, each brought back to the device when
it is read. The same tensors come back bit for bit, so every placement gives the same model.
"""

from __future__ import annotations

import itertools
import tempfile
from collections import defaultdict
from collections.abc import MutableSequence
from pathlib import Path

import torch

PLACES = ("device", "cpu", "disk")

# how many stream-sized tensors the sub-layer walk may hold at once (two streams, the dense outputs, the
# attention's recorded outputs on both streams, down_proj's kept inputs at 2.7x the hidden width): the
# ``auto`` placement keeps the lists where this many fit in half the free memory
_LISTS_AT_ONCE = 8


class _FilePool:
    """The files of a disk placement. A freed item's file is written over by a later item, not deleted: writing over
    a file's cached pages is about 10x faster than filling a new file's (measured: 0.4 against 3-9 ms per 4.7 MB,
    a quarter of the sub-layer walk's time on disk). The folder holds as many files as items were alive at once."""

    def __init__(self, folder: Path):
        self.folder, self._names, self._free = folder, itertools.count(), defaultdict(list)

    def take(self, nbytes: int) -> Path:
        """A free file, one of ``nbytes`` where there is one (nothing to truncate or extend), else a new one."""
        if self._free[nbytes]:
            return self._free[nbytes].pop()
        other = next((paths for paths in self._free.values() if paths), None)
        return other.pop() if other else self.folder / f"{next(self._names)}.bin"

    def give_back(self, path: Path, nbytes: int) -> None:
        self._free[nbytes].append(path)


class _File:
    """A tensor's bytes in a file of ``pool``; the file goes back to the pool with this handle (the last list that
    held it let go)."""

    def __init__(self, pool: _FilePool, tensor: torch.Tensor):
        tensor = tensor.detach().to("cpu").contiguous()
        self.pool, self.dtype, self.shape, self.nbytes = pool, tensor.dtype, tensor.shape, tensor.nbytes
        self.path = pool.take(self.nbytes)
        with open(self.path, "r+b" if self.path.exists() else "wb") as file:
            file.write(_bytes_of(tensor))
            file.truncate()

    def load(self) -> torch.Tensor:
        tensor = torch.empty(self.shape, dtype=self.dtype)
        with open(self.path, "rb") as file:
            if file.readinto(_bytes_of(tensor)) != self.nbytes:
                raise OSError(f"{self.path} is shorter than the {self.nbytes} bytes written to it")
        return tensor

    def __del__(self):
        self.pool.give_back(self.path, self.nbytes)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's memory as bytes (numpy has no bfloat16: viewed as uint8 first)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class Activations:
    """Makes the walk's per-batch lists for one placement: ``device`` (plain lists, nothing moves), ``cpu``
    (items in host memory, moved to ``device`` when read) or ``disk`` (items in files of a temporary folder
    under ``folder``, the system's temporary folder by default: set TMPDIR to a large disk). Use as a context
    manager: the folder goes at exit."""

    def __init__(self, place: str, device: torch.device | str = "cpu", folder: str | Path | None = None):
        if place not in PLACES:
            raise ValueError(f"unknown activation placement {place!r}: one of {', '.join(PLACES)}")
        self.place, self.device = place, torch.device(device)
        self._parent, self._folder, self._files = folder, None, None

    def __enter__(self) -> Activations:
        if self.place == "disk":
            self._folder = tempfile.TemporaryDirectory(prefix="compress-activations-", dir=self._parent)
            self._files = _FilePool(Path(self._folder.name))
        return self

    def __exit__(self, *exc) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def new(self, items=()) -> list | OffloadedList:
        """A list of per-batch tensors held in this placement, filled from ``items`` one at a time."""
        if self.place == "device":
            return list(items)
        held = OffloadedList(self)
        if isinstance(items, OffloadedList) and items._activations is self:  # a copy shares the held items
            held._items = list(items._items)
            return held
        for item in items:
            held.append(item)
        return held

    def hold(self, value):
        """``value`` (a tensor, None, or a tuple of them) as this placement keeps it; :meth:`load` gives it back."""
        if isinstance(value, tuple):
            return tuple(self.hold(item) for item in value)
        if value is None or self.place == "device":
            return value
        if self.place == "cpu":
            return value.detach().to("cpu")
        return _File(self._files, value)

    def load(self, held):
        if isinstance(held, tuple):
            return tuple(self.load(item) for item in held)
        if isinstance(held, _File):
            held = held.load()
        return held if held is None else held.to(self.device)


class OffloadedList(MutableSequence):
    """A list whose items an :class:`Activations` holds off the device; reading an item loads it."""

    def __init__(self, activations: Activations):
        self._activations, self._items = activations, []

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._activations.load(item) for item in self._items[index]]
        return self._activations.load(self._items[index])

    def __setitem__(self, index, value) -> None:
        if isinstance(index, slice) and isinstance(value, OffloadedList) and value._activations is self._activations:
            self._items[index] = list(value._items)  # the same held items, not a copy of each
        elif isinstance(index, slice):
            self._items[index] = [self._activations.hold(item) for item in value]
        else:
            self._items[index] = self._activations.hold(value)

    def __delitem__(self, index) -> None:
        del self._items[index]

    def insert(self, index: int, value) -> None:
        self._items.insert(index, self._activations.hold(value))


def choose_place(place: str, stream_bytes: int, device: torch.device) -> str:
    """``place`` itself, or for ``auto``: the device when :data:`_LISTS_AT_ONCE` lists of ``stream_bytes`` fit
    in half its free memory, else CPU memory (from a GPU) when they fit there, else disk."""
    if place != "auto":
        return place
    need = _LISTS_AT_ONCE * stream_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need <= free / 2:
            return "device"
        return "cpu" if need <= _free_host_bytes() / 2 else "disk"
    return "device" if need <= _free_host_bytes() / 2 else "disk"


def _free_host_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available
