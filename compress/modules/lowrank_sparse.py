"""LowRankSparseLinear: y = U (V x) + S_c x + bias, the LOST replacement for an nn.Linear.

S_c is channel-wise sparse: it is non-zero only in ``c`` whole input channels (columns), stored
as ``sc_values`` [out, c] (a parameter) and ``sc_channels`` [c] (an int32 buffer, ascending).
Parameters: r (out + in) + c * out; index bytes: 4 c.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import lowrank_sparse_linear


class LowRankSparseLinear(nn.Module):
    spec_type = "lowrank_sparse"
    adapter_parameters = ("U", "V", "sc_values")  # the channels stay fixed

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        channels: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} out of range for a {out_features}x{in_features} matrix")
        if not 0 <= channels <= in_features:
            raise ValueError(f"channels={channels} must be in 0..in_features={in_features}")
        self.in_features, self.out_features, self.rank, self.channels = in_features, out_features, rank, channels
        factory = {"dtype": dtype, "device": device}
        self.U = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.V = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.sc_values = nn.Parameter(torch.zeros(out_features, channels, **factory))
        self.register_buffer("sc_channels", torch.arange(channels, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None

    @classmethod
    def from_factors(
        cls,
        U: torch.Tensor,
        V: torch.Tensor,
        sc_values: torch.Tensor,
        sc_channels: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> LowRankSparseLinear:
        channels = sc_channels.reshape(-1)
        if sc_values.shape != (U.shape[0], channels.numel()):
            raise ValueError(f"sc_values {tuple(sc_values.shape)} must be [out, c] = {(U.shape[0], channels.numel())}")
        order = channels.argsort()  # store channels ascending (the kernels' convention)
        layer = cls(
            V.shape[1], U.shape[0], U.shape[1], channels.numel(), bias=bias is not None, dtype=U.dtype, device=U.device
        )
        with torch.no_grad():
            layer.U.copy_(U)
            layer.V.copy_(V)
            layer.sc_values.copy_(sc_values[:, order])
            layer.sc_channels.copy_(channels[order].to(torch.int32))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def spec(self) -> dict:
        return {
            "type": self.spec_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "channels": self.channels,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype | None = None, device=None) -> LowRankSparseLinear:
        return cls(
            spec["in_features"],
            spec["out_features"],
            spec["rank"],
            spec["channels"],
            spec["bias"],
            dtype=dtype,
            device=device,
        )

    @property
    def sparse(self) -> torch.Tensor:
        """S_c as a dense [out, in] matrix (for analysis)."""
        dense = torch.zeros(
            self.out_features, self.in_features, dtype=self.sc_values.dtype, device=self.sc_values.device
        )
        return dense.index_copy(1, self.sc_channels.long(), self.sc_values)

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent U @ V + S_c (materialised on demand; not used by the forward)."""
        return self.U @ self.V + self.sparse

    @property
    def stored_params(self) -> int:
        return (
            self.U.numel()
            + self.V.numel()
            + self.sc_values.numel()
            + (self.bias.numel() if self.bias is not None else 0)
        )

    @property
    def index_bytes(self) -> int:
        return self.sc_channels.numel() * self.sc_channels.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_sparse_linear(x, self.U, self.V, self.sc_values, self.sc_channels, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"channels={self.channels}, bias={self.bias is not None}"
        )
