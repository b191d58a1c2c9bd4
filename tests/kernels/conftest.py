# Must run before anything imports triton: the @triton.jit kernels decide at import time
# whether they are compiled for a GPU or run by the interpreter on the CPU.
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_kernel_env(monkeypatch):
    """Each test starts from the default dispatch (no forced backend, no poisoning by env)."""
    monkeypatch.delenv("COMPRESS_KERNELS", raising=False)
    monkeypatch.delenv("COMPRESS_KERNELS_POISON", raising=False)


@pytest.fixture(scope="session")
def interpreted():
    """Fail (never skip) when the kernels would not run under the interpreter."""
    from compress.kernels._triton_common import is_interpreted
    from compress.kernels.dense_sparse import triton_impl as ds
    from compress.kernels.lowrank import triton_impl as lr
    from compress.kernels.lowrank_sparse import triton_impl as ls

    kernels = [lr._lowrank_fwd_kernel, ds._dense_sparse_fwd_kernel, ls._lowrank_sparse_fwd_kernel]
    assert all(is_interpreted(k) for k in kernels), (
        "triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1"
    )
    return True
