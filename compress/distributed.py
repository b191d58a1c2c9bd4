"""Several processes on one or more machines (``torchrun`` on CPUs, ``accelerate launch`` on GPUs).

Every process runs the same pipeline on its share of the calibration and evaluation windows; the statistics
(input covariances, output sensitivities, token counts, perplexity sums) are summed across processes with
``all_reduce``, so every process derives the same factors from the same numbers, and only the main process
writes. With a single process every function here is a no-op.
"""

from __future__ import annotations

import os

import torch


def launched() -> bool:
    """Started by a distributed launcher (torchrun / accelerate launch) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group the launcher describes (gloo on CPU, nccl on GPUs), and give each process its
    share of the machine's cores unless OMP_NUM_THREADS says otherwise."""
    if not launched() or torch.distributed.is_initialized():
        return
    from datetime import timedelta

    from accelerate import PartialState

    # the other processes wait in their next all-reduce while the main one runs lm-eval and writes the
    # checkpoint: far longer than the default 10 (nccl) or 30 (gloo) minutes on a large model
    PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=12))
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def close(finished: bool) -> None:
    """Leave the process group. A process that has ``finished`` first waits for the others (one that failed
    leaves at once: the launcher stops the rest). A group left to the interpreter's exit tears gloo's threads
    down in any order: a process that finished early could abort ("terminate called") and the launcher then
    killed the main one mid-report."""
    if not torch.distributed.is_initialized():
        return
    if finished:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def device() -> torch.device:
    """This process's device: its own GPU under a launcher, else cuda if present, else the CPU."""
    if torch.distributed.is_initialized():
        from accelerate import PartialState

        here = PartialState().device
        # "cpu:0": a tensor moved there from "cpu" is copied, and a copied Parameter comes back a plain Tensor
        return torch.device("cpu") if here.type == "cpu" else here
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This process's share of ``windows`` (every world_size-th, starting at its rank)."""
    if world_size() == 1:
        return windows
    if len(windows) < world_size():
        from .errors import CompressError

        raise CompressError(f"{len(windows)} windows cannot be shared by {world_size()} processes")
    return windows[rank() :: world_size()]


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over every process, in place (through this process's device when the backend needs it:
    nccl reduces GPU tensors only)."""
    if world_size() == 1:
        return tensor
    here = device()
    if tensor.device == here or torch.distributed.get_backend() == "gloo":
        torch.distributed.all_reduce(tensor)
    else:
        moved = tensor.to(here)
        torch.distributed.all_reduce(moved)
        tensor.copy_(moved)
    return tensor


def sum_number(value: float) -> float:
    if world_size() == 1:
        return value
    return float(sum_(torch.tensor([value], dtype=torch.float64)).item())


def most(value: int) -> int:
    """The largest of every process's ``value``."""
    if world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.int64, device=device())
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX)
    return int(total.item())


def barrier() -> None:
    """Wait until every process gets here (e.g. until the main one has written what the others read)."""
    if world_size() > 1:
        torch.distributed.barrier()


def gather_shares(share: torch.Tensor) -> torch.Tensor | None:
    """Every process's :func:`shard` of some windows' tensor (``[n_rank, ...]``), reassembled on the main process
    in window order (None on the others); with one process, ``share`` itself."""
    if world_size() == 1:
        return share
    parts = [None] * world_size() if is_main() else None
    torch.distributed.gather_object(share.cpu(), parts, dst=0)
    return _in_window_order(parts) if is_main() else None


def share_with_all(share: torch.Tensor) -> torch.Tensor:
    """Every process's :func:`shard` of some windows' tensor, reassembled in window order on every process (on
    ``share``'s device): what one process would hold for all the windows."""
    if world_size() == 1:
        return share
    parts = [None] * world_size()
    torch.distributed.all_gather_object(parts, share.cpu())
    return _in_window_order(parts).to(share.device)


def _in_window_order(parts: list[torch.Tensor]) -> torch.Tensor:
    """Process r's part holds windows r, r + world_size, ...: interleave them back."""
    whole = parts[0].new_empty((sum(len(p) for p in parts), *parts[0].shape[1:]), device="cpu")
    for r, part in enumerate(parts):
        whole[r :: len(parts)] = part
    return whole
