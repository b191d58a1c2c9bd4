"""Fused Triton kernels for compressed linear layers, with PyTorch references.

Public ops (x [..., n] -> y [..., m], output in x.dtype, differentiable in every float input):

* ``lowrank_linear(x, A, B, bias=None)``                   y = (x B^T) A^T + bias;  A [m, k], B [k, n]
* ``dense_sparse_linear(x, D, values, indices, k, bias=None)`` y = D (S x) + bias; D [m, k], S k x n
  with s non-zeros per column as values/indices [s, n] (see ``sparse_format``)
* ``lowrank_sparse_linear(x, U, V, sc_values, sc_channels, bias=None)``
  y = U (V x) + sc_values x[..., sc_channels] + bias;  U [m, r], V [r, n], sc_values [m, c]

Dispatch: the reference unless ``COMPRESS_KERNELS=triton`` (on an H200 the kernels measured slower than the
reference's cuBLAS products; see ``_dispatch``). Importing this package does not import triton.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _hub_kernels_spec():
    """Hugging Face's own ``kernels`` package when this folder is being imported under that top-level name.

    This folder is installed as ``compress.kernels``. It is imported as plain ``kernels`` only when the source
    checkout is on sys.path (``python -m compress`` or ``python -c`` run from it), and there it would shadow the
    kernel-hub package that transformers imports at start-up. Returns None when that package is not installed.
    """
    if __name__ != "kernels":
        return None
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
    return importlib.machinery.PathFinder.find_spec("kernels", elsewhere)


_hub_spec = _hub_kernels_spec()
if _hub_spec is not None:
    # Step aside: the import system returns whatever sys.modules holds under this name once we are done.
    _hub = importlib.util.module_from_spec(_hub_spec)
    sys.modules["kernels"] = _hub
    _hub_spec.loader.exec_module(_hub)
else:
    from ._dispatch import choose_backend, dispatch_counts, force_backend, requested_backend, triton_config
    from .dense_sparse import dense_sparse_linear
    from .lowrank import lowrank_linear
    from .lowrank_sparse import lowrank_sparse_linear
    from .sparse_format import colsparse_to_dense, dense_to_colsparse, dense_to_nm_colsparse, storage_bytes

    __all__ = [
        "lowrank_linear",
        "dense_sparse_linear",
        "lowrank_sparse_linear",
        "dense_to_colsparse",
        "dense_to_nm_colsparse",
        "colsparse_to_dense",
        "storage_bytes",
        "choose_backend",
        "requested_backend",
        "force_backend",
        "triton_config",
        "dispatch_counts",
    ]
