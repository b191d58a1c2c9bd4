"""GroupedLowRankLinear: a low-rank projection with one latent per group of output rows (Palu).

For a GQA key/value projection the output rows are heads; splitting them into G head groups and
factorising each group's rows separately, W_g ~= A_g B_g, gives a per-group latent z_g = B_g x of
rank r. The latents (G * r values per token) are what a KV cache can store instead of the full
keys/values; A_g reconstructs the group's heads from its latent. G = 1 is the plain (joint)
LowRankLinear; G = number of KV heads is Palu's per-head decomposition.
"""

from __future__ import annotations

import torch
from torch import nn


class GroupedLowRankLinear(nn.Module):
    """y = concat_g(A_g (B_g x)) + bias with ``A`` [G, out/G, r] and ``B`` [G * r, in]."""

    spec_type = "grouped_lowrank"
    adapter_parameters = ("A", "B")  # A is [groups, rows, rank]: one adapter per group

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: int,
        rank: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if groups < 1 or out_features % groups:
            raise ValueError(f"{groups} groups do not divide {out_features} output features")
        rows = out_features // groups
        if not 0 < rank <= min(rows, in_features):
            raise ValueError(f"rank {rank} out of range for {groups} groups of {rows}x{in_features}")
        self.in_features, self.out_features, self.groups, self.rank = in_features, out_features, groups, rank
        factory = {"dtype": dtype, "device": device}
        self.A = nn.Parameter(torch.empty(groups, rows, rank, **factory))
        self.B = nn.Parameter(torch.empty(groups * rank, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None

    @classmethod
    def from_factors(
        cls, factors: list[tuple[torch.Tensor, torch.Tensor]], bias: torch.Tensor | None = None
    ) -> GroupedLowRankLinear:
        """``factors``: one (A_g [rows, r], B_g [r, in]) per group, in output-row order."""
        A0, B0 = factors[0]
        layer = cls(
            B0.shape[1],
            A0.shape[0] * len(factors),
            len(factors),
            A0.shape[1],
            bias=bias is not None,
            dtype=A0.dtype,
            device=A0.device,
        )
        with torch.no_grad():
            layer.A.copy_(torch.stack([A for A, _ in factors]))
            layer.B.copy_(torch.cat([B for _, B in factors]))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def spec(self) -> dict:
        return {
            "type": self.spec_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "groups": self.groups,
            "rank": self.rank,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype | None = None, device=None) -> GroupedLowRankLinear:
        return cls(
            spec["in_features"],
            spec["out_features"],
            spec["groups"],
            spec["rank"],
            spec["bias"],
            dtype=dtype,
            device=device,
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent (materialised on demand; for analysis, not the forward)."""
        B = self.B.view(self.groups, self.rank, self.in_features)
        return torch.bmm(self.A, B).reshape(self.out_features, self.in_features)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """The per-group latents [..., G, r]: what a latent KV cache would store."""
        return nn.functional.linear(x, self.B).unflatten(-1, (self.groups, self.rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("...gr,gor->...go", self.latent(x), self.A).flatten(-2)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )
