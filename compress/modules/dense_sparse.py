"""DenseSparseLinear: y = D (S x) + bias, the DSFormer replacement for an nn.Linear.

W (out x in) ~= D (out x k, dense) @ S (k x in, s non-zeros in EVERY column). S is stored in
the compact column format of ``compress.kernels.sparse_format``: ``values`` [s, in] (a trainable
parameter) and ``indices`` [s, in] (a small-integer buffer, int16 when k <= 32768), so a
checkpoint holds m*k + s*n values plus s*n indices instead of m*n values.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import colsparse_to_dense, dense_sparse_linear, dense_to_colsparse, dense_to_nm_colsparse

_INDEX_DTYPES = {"int16": torch.int16, "int32": torch.int32}
PATTERNS = ("topk", "2:4")


def index_dtype_for(k: int) -> torch.dtype:
    return torch.int16 if k <= torch.iinfo(torch.int16).max + 1 else torch.int32


class DenseSparseLinear(nn.Module):
    """D [out, k] @ S [k, in] with a fixed number ``s`` of non-zeros per column of S.

    ``pattern`` records how S's support was constrained ("topk": any s rows per column;
    "2:4": 2 of every 4 consecutive rows, s = k/2); the storage is the same for both.
    """

    spec_type = "dense_sparse"
    adapter_parameters = ("D",)  # the dense factor (peft cannot wrap a parameter called "values")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        k: int,
        s: int,
        bias: bool = False,
        pattern: str = "topk",
        index_dtype: torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if not 0 < k:
            raise ValueError(f"inner dimension k={k} must be positive")
        if not 0 < s <= k:
            raise ValueError(f"s={s} non-zeros per column must be in 1..k={k}")
        if pattern not in PATTERNS:
            raise ValueError(f"pattern {pattern!r} is not one of {PATTERNS}")
        if pattern == "2:4" and (k % 4 or 2 * s != k):
            raise ValueError(f"pattern 2:4 needs k divisible by 4 and s = k/2 (got k={k}, s={s})")
        index_dtype = index_dtype or index_dtype_for(k)
        if index_dtype not in _INDEX_DTYPES.values():
            raise ValueError(f"index dtype must be int16 or int32, got {index_dtype}")
        self.in_features, self.out_features, self.k, self.s, self.pattern = in_features, out_features, k, s, pattern
        factory = {"dtype": dtype, "device": device}
        self.D = nn.Parameter(torch.empty(out_features, k, **factory))
        self.values = nn.Parameter(torch.zeros(s, in_features, **factory))
        # a valid placeholder support (rows 0..s-1) until real indices are loaded or copied in
        rows = torch.arange(s, device=device, dtype=index_dtype)[:, None].expand(s, in_features).contiguous()
        self.register_buffer("indices", rows)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_factors(
        cls,
        D: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor,
        bias: torch.Tensor | None = None,
        pattern: str = "topk",
    ) -> DenseSparseLinear:
        (m, k), (s, n) = D.shape, values.shape
        if indices.shape != values.shape:
            raise ValueError(f"indices {tuple(indices.shape)} must match values {tuple(values.shape)}")
        index_dtype = indices.dtype if indices.dtype in _INDEX_DTYPES.values() else index_dtype_for(k)
        layer = cls(
            n, m, k, s, bias=bias is not None, pattern=pattern, index_dtype=index_dtype, dtype=D.dtype, device=D.device
        )
        with torch.no_grad():
            layer.D.copy_(D)
            layer.values.copy_(values.to(D.dtype))
            layer.indices.copy_(indices.to(index_dtype))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_dense_factors(
        cls, D: torch.Tensor, S: torch.Tensor, s: int, bias: torch.Tensor | None = None, pattern: str = "topk"
    ) -> DenseSparseLinear:
        """Compact form of D @ S, keeping the s largest entries of each column of S (or 2:4 along k)."""
        index_dtype = index_dtype_for(S.shape[0])
        if pattern == "2:4":
            values, indices = dense_to_nm_colsparse(S.detach(), 2, 4, index_dtype=index_dtype)
        else:
            values, indices = dense_to_colsparse(S.detach(), s, index_dtype=index_dtype)
        return cls.from_factors(D.detach(), values, indices, bias, pattern)

    # ------------------------------------------------------------------ checkpoint spec
    def spec(self) -> dict:
        index_name = next(name for name, dt in _INDEX_DTYPES.items() if dt == self.indices.dtype)
        return {
            "type": self.spec_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "k": self.k,
            "s": self.s,
            "bias": self.bias is not None,
            "pattern": self.pattern,
            "index_dtype": index_name,
        }

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype | None = None, device=None) -> DenseSparseLinear:
        index_name = spec.get("index_dtype", "int16")
        if index_name not in _INDEX_DTYPES:
            raise ValueError(f"dense_sparse: unknown index_dtype {index_name!r}")
        return cls(
            spec["in_features"],
            spec["out_features"],
            spec["k"],
            spec["s"],
            spec["bias"],
            pattern=spec.get("pattern", "topk"),
            index_dtype=_INDEX_DTYPES[index_name],
            dtype=dtype,
            device=device,
        )

    # ------------------------------------------------------------------ views and sizes
    @property
    def sparse(self) -> torch.Tensor:
        """S as a dense [k, in] matrix (for analysis)."""
        return colsparse_to_dense(self.values, self.indices, self.k)

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent D @ S (materialised on demand; not used by the forward)."""
        return self.D @ self.sparse

    @property
    def stored_params(self) -> int:
        """Values stored (D, S's non-zeros, bias): the parameter count of this layer."""
        return self.D.numel() + self.values.numel() + (self.bias.numel() if self.bias is not None else 0)

    @property
    def index_bytes(self) -> int:
        return self.indices.numel() * self.indices.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_sparse_linear(x, self.D, self.values, self.indices, self.k, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, s={self.s}, "
            f"pattern={self.pattern}, bias={self.bias is not None}"
        )
