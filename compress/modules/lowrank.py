"""LowRankLinear: y = A (B x) + bias, the replacement for a factorised nn.Linear."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import lowrank_linear


class LowRankLinear(nn.Module):
    """A rank-k factorisation W ~= A @ B of an (out x in) linear layer.

    ``A`` is (out_features x rank), ``B`` is (rank x in_features). Stored as two
    nn.Linear-style parameters so peft/accelerate treat them as ordinary weights.
    """

    spec_type = "lowrank"
    adapter_parameters = ("A", "B")  # LoRA (compress.adapters) on each factor: a merge keeps the rank

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} out of range for a {out_features}x{in_features} matrix")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        factory = {"dtype": dtype, "device": device}
        self.A = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.B = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        layer = cls(B.shape[1], A.shape[0], A.shape[1], bias=bias is not None, dtype=A.dtype, device=A.device)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    # -- checkpoint spec: enough to rebuild the empty module before weights load --
    def spec(self) -> dict:
        return {"type": self.spec_type, "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype | None = None, device=None) -> "LowRankLinear":
        return cls(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"], dtype=dtype, device=device)

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent A @ B (materialised on demand; for analysis, not the forward)."""
        return self.A @ self.B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two thin matmuls: k(m+n) multiply-adds per token instead of m*n (fused Triton kernel on
        # CUDA, the PyTorch reference elsewhere).
        return lowrank_linear(x, self.A, self.B, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
