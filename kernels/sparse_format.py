"""Column-wise semi-structured sparse format used by ``dense_sparse_linear``.

A k x n matrix S with a FIXED number ``s`` of non-zeros in EVERY column is stored as

* ``values``  [s, n] float: the non-zeros of column j are ``values[:, j]``;
* ``indices`` [s, n] int16 or int32: their row numbers in 0..k-1, distinct within a column
  (``dense_to_colsparse`` sorts them ascending; the kernels do not need any order).

Storage is s*n*(value bytes + index bytes) instead of k*n*value bytes. N:M patterns along k
(e.g. 2:4: 2 kept in every group of 4 consecutive rows of a column) are the special case
s = k*N/M produced by ``dense_to_nm_colsparse``.
"""

from __future__ import annotations

import torch

INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


def _default_index_dtype(k: int) -> torch.dtype:
    return torch.int16 if k <= torch.iinfo(torch.int16).max + 1 else torch.int32


def dense_to_colsparse(
    S_dense: torch.Tensor, s: int, index_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``s`` largest-magnitude entries of every column of ``S_dense`` [k, n].

    Returns ``(values [s, n], indices [s, n])``, indices sorted ascending in each column;
    ties are broken by ``torch.topk``. ``index_dtype`` defaults to int16 when k <= 32768, else int32.
    """
    if S_dense.dim() != 2:
        raise ValueError(f"S_dense must be 2-D [k, n], got shape {tuple(S_dense.shape)}")
    k, _ = S_dense.shape
    if not 0 <= s <= k:
        raise ValueError(f"s={s} non-zeros per column must be in 0..k={k}")
    index_dtype = index_dtype or _default_index_dtype(k)
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index_dtype must be one of {INDEX_DTYPES}, got {index_dtype}")
    if index_dtype == torch.int16 and k > torch.iinfo(torch.int16).max + 1:
        raise ValueError(f"k={k} rows do not fit int16 indices")
    idx = S_dense.detach().abs().topk(s, dim=0).indices.sort(dim=0).values
    values = S_dense.gather(0, idx)
    return values, idx.to(index_dtype)


def dense_to_nm_colsparse(
    S_dense: torch.Tensor, n_keep: int = 2, group: int = 4, index_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M pattern along k: in every column keep the ``n_keep`` largest-magnitude entries of each
    group of ``group`` consecutive rows (2:4 by default). k must be divisible by ``group``;
    the result has s = k * n_keep / group non-zeros per column."""
    if S_dense.dim() != 2:
        raise ValueError(f"S_dense must be 2-D [k, n], got shape {tuple(S_dense.shape)}")
    k, n = S_dense.shape
    if not 0 < n_keep <= group or k % group:
        raise ValueError(f"need 0 < n_keep={n_keep} <= group={group} and k={k} divisible by group")
    index_dtype = index_dtype or _default_index_dtype(k)
    grouped = S_dense.detach().abs().reshape(k // group, group, n)
    local = grouped.topk(n_keep, dim=1).indices.sort(dim=1).values  # [k/group, n_keep, n]
    base = torch.arange(0, k, group, device=S_dense.device).view(-1, 1, 1)
    idx = (local + base).reshape(-1, n)  # ascending per column
    return S_dense.gather(0, idx), idx.to(index_dtype)


def colsparse_to_dense(values: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of ``dense_to_colsparse``: a dense [k, n] matrix (differentiable w.r.t. ``values``)."""
    check_colsparse(values, indices, k)
    dense = torch.zeros(k, values.shape[1], dtype=values.dtype, device=values.device)
    return dense.scatter(0, indices.long(), values)


def storage_bytes(values: torch.Tensor, indices: torch.Tensor) -> int:
    """Bytes needed to store the compact format (values + indices)."""
    return values.numel() * values.element_size() + indices.numel() * indices.element_size()


def check_colsparse(values: torch.Tensor, indices: torch.Tensor, k: int) -> None:
    """Cheap structural checks (no device sync: index ranges are not checked here)."""
    if values.dim() != 2 or indices.shape != values.shape:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be [s, n]")
    if not values.is_floating_point():
        raise TypeError(f"values must be floating point, got {values.dtype}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"indices must be int16/int32/int64, got {indices.dtype}")
    if values.shape[0] > k:
        raise ValueError(f"s={values.shape[0]} non-zeros per column exceeds k={k}")
    if values.device != indices.device:
        raise ValueError(f"values on {values.device} but indices on {indices.device}")
