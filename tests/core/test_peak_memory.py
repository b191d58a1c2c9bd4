"""Peak memory is the process's own: a run started by a process that held more must not report its parent's."""

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and exec carry ru_maxrss over on Linux")
def test_a_child_process_reports_its_own_peak_not_its_parents():
    held = bytearray(512 << 20)  # this process touches 512 MiB before starting the child
    for i in range(0, len(held), 4096):
        held[i] = 1
    code = "from compress.utils import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 400 << 20  # the child imports torch (~300 MiB) but never holds 512 MiB
    del held


LARGE_BLOCK = """
import ctypes
import sys

import torch

from compress.utils import map_large_allocations, map_large_allocations_when_tight


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "mapped":
    map_large_allocations()
if sys.argv[1] in ("tight", "roomy"):  # a model of 1 PB, or of nothing, against the memory available
    assert map_large_allocations_when_tight(10**15 if sys.argv[1] == "tight" else 0) == (sys.argv[1] == "tight")
torch.ones(8 << 18)  # 8 MiB, freed at once: glibc's own threshold rises above the block below
mapped = libc.mallinfo2().hblkhd
block = torch.ones(6 << 18)  # 6 MiB, as a layer's activations
print(libc.mallinfo2().hblkhd - mapped)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_get_their_own_mapping_which_freeing_returns():
    def mapped_bytes(mode):
        run = subprocess.run([sys.executable, "-c", LARGE_BLOCK, mode], capture_output=True, text=True, check=True)
        return int(run.stdout)

    assert mapped_bytes("mapped") >= 6 << 20  # its own mapping: unmapped, not kept, when freed
    assert mapped_bytes("heap") == 0  # glibc's default after a larger free: from the heap, resident once freed
    # mapped only where memory is tight: elsewhere the heap reuses freed blocks without fresh page faults
    assert mapped_bytes("tight") >= 6 << 20
    assert mapped_bytes("roomy") == 0


HEAP_TOP = """
import resource

import torch

from compress.utils import map_large_allocations

map_large_allocations()
x = torch.randn(2, 512, 576)
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):  # 50 batches' elementwise steps, three 2.4 MB blocks from the heap each
    y = x.square()
    z = y * 2
    del y
    w = z.abs()
    del z, w
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)  # page faults
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_mapped_large_blocks_keep_the_heaps_top():
    faults = int(subprocess.run([sys.executable, "-c", HEAP_TOP], capture_output=True, text=True, check=True).stdout)
    # glibc's trim threshold stays at 128 KiB once the mapping threshold is set: a freed block at the heap's top
    # goes back to the system at once, and the next batch faults its pages in afresh (up to every batch's pages,
    # as blocks happen to end the heap; about the first batch's with the top kept)
    assert faults < 4 * 3 * (2 * 512 * 576 * 4 // 4096)  # four batches' pages


MANY_SHAPES = """
import sys

import torch

from compress.utils import bound_kernel_caches, trim_heap


def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20


if sys.argv[1] == "bounded":
    bound_kernel_caches()
x = torch.randn(2048, 576)
# 100 low-rank modules, each of its own rank, as a sensitivity allocation gives
factors = [(torch.randn(rank, 576), torch.randn(576, rank)) for rank in range(100, 400, 3)]
trim_heap()
start = resident_mib()
for B, A in factors:
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        y = (x @ B.T) @ A.T
del y
trim_heap()  # what stays is what the kernels' caches hold
print(resident_mib() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory read from /proc")
def test_bf16_matmuls_of_many_shapes_keep_a_bounded_kernel_cache():
    import os

    # oneDNN's defaults: earlier tests' compress() calls set the bounds in this process's environment
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}

    def growth(mode):
        command = [sys.executable, "-c", MANY_SHAPES, mode]
        return float(subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout)

    default = growth("default")
    if default < 64:
        pytest.skip(f"bf16 matmuls on this CPU keep no per-shape kernels ({default:.0f} MiB for 100 shapes)")
    assert growth("bounded") < default / 2


def test_the_walk_maps_blocks_above_a_batchs_widest_activation():
    from types import SimpleNamespace

    from compress.pipeline import _above_batch_activations

    smollm2 = SimpleNamespace(hidden_size=576, intermediate_size=1536)
    # 4 windows of 512 tokens: MLP activations of 2048 x 1536 float32 values, 12 MiB, stay on the heap
    assert _above_batch_activations(smollm2, 4 * 512) == 16 << 20
    assert _above_batch_activations(smollm2, 2 * 512) == 8 << 20
    assert _above_batch_activations(SimpleNamespace(hidden_size=4096), 512) == 16 << 20  # no MLP width given
