"""Straight-Through Factorizer training module (DSFormer, arXiv 2312.13211).

During training S is a dense latent; the forward pass uses its projection onto the s largest
entries of every column (or 2:4), the backward pass sends the gradient straight through to the
whole latent, so entries outside the current support can grow into it. ``to_compact`` stores the
projected S in the compact (values, indices) form again.
"""

from __future__ import annotations

import torch
from torch import nn

from ...modules import DenseSparseLinear
from .factorize import project_columns


class STFDenseSparseLinear(nn.Module):
    def __init__(self, layer: DenseSparseLinear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.k, self.s, self.pattern = layer.k, layer.s, layer.pattern
        self.D = nn.Parameter(layer.D.detach().clone())
        self.latent = nn.Parameter(layer.sparse.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def projected(self) -> torch.Tensor:
        """Forward: top-s per column; backward: identity (straight through)."""
        hard = project_columns(self.latent.detach(), self.s, self.pattern)
        return self.latent + (hard - self.latent).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.projected()), self.D, self.bias)

    def to_compact(self) -> DenseSparseLinear:
        with torch.no_grad():
            hard = project_columns(self.latent, self.s, self.pattern)
            return DenseSparseLinear.from_dense_factors(self.D, hard, self.s, self.bias, self.pattern)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, s={self.s}"
