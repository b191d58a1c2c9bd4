"""LowRankLinear: y = A (B x) + bias, the replacement for a factorised nn.Linear."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import lowrank_linear


class LowRankLinear(nn.Module):
    """A rank-k factorisation W ~= A @ B of an (out x in) linear layer.

    ``A`` is (out_features x rank), ``B`` is (rank x in_features). Stored as two
    nn.Linear-style parameters so peft/accelerate treat them as ordinary weights.

    Elastic (``curve_points > 0``): the factors are ordered by importance, so every prefix of rank r is
    that layer's best rank-r approximation; ``active_rank`` (saved) selects the prefix the forward uses
    (views of the stored factors, no copy), and ``curve_ranks`` / ``curve_loss`` (buffers, saved with the
    weights) hold the estimated loss against rank that lets ``compress.set_budget`` re-allocate ranks for
    any budget without calibration data. A matrix that some budget keeps dense also stores its dense
    ``dense_weight``; ``dense_active`` (saved) makes the forward use it instead of the factors.
    """

    spec_type = "lowrank"
    adapter_parameters = ("A", "B")  # LoRA (compress.adapters) on each factor: a merge keeps the rank

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        curve_points: int = 0,
        active_rank: int | None = None,
        dense: bool = False,
        dense_active: bool = False,
    ):
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} out of range for a {out_features}x{in_features} matrix")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        factory = {"dtype": dtype, "device": device}
        self.A = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.B = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.curve_points = curve_points
        if curve_points:
            self.register_buffer("curve_ranks", torch.zeros(curve_points, dtype=torch.int64, device=device))
            self.register_buffer("curve_loss", torch.zeros(curve_points, dtype=torch.float32, device=device))
        self.active_rank = active_rank
        self.dense_weight = nn.Parameter(torch.empty(out_features, in_features, **factory)) if dense else None
        self.dense_active = dense_active

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        layer = cls(B.shape[1], A.shape[0], A.shape[1], bias=bias is not None, dtype=A.dtype, device=A.device)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def set_curve(self, ranks: torch.Tensor, loss: torch.Tensor) -> None:
        """Make the module elastic: the estimated loss at ``ranks`` (ascending, from 0 to ``self.rank``)."""
        self.curve_points = len(ranks)
        self.register_buffer("curve_ranks", ranks.to(torch.int64).to(self.A.device))
        self.register_buffer("curve_loss", loss.to(torch.float32).to(self.A.device))

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) moves the loss curve but must not round it: a resize compares the losses of
        # neighbouring ranks, which differ by less than bfloat16 resolves
        loss = self._buffers.get("curve_loss")
        super()._apply(fn, recurse)
        if loss is not None and self.curve_loss.dtype != torch.float32:
            self._buffers["curve_loss"] = loss.to(device=self.curve_loss.device)
        return self

    def curve(self) -> torch.Tensor:
        """The estimated loss at every rank 0 .. ``self.rank``: as stored, or linear between the stored points
        (checkpoints written before every rank was stored kept at most 257 of them)."""
        ranks, loss = self.curve_ranks.double().cpu(), self.curve_loss.double().cpu()
        if len(ranks) == self.rank + 1:
            return loss
        grid = torch.arange(self.rank + 1, dtype=torch.float64)
        upper = torch.searchsorted(ranks, grid).clamp(1, len(ranks) - 1)
        lo, hi = ranks[upper - 1], ranks[upper]
        t = ((grid - lo) / (hi - lo).clamp_min(1)).clamp(0, 1)
        return loss[upper - 1] + t * (loss[upper] - loss[upper - 1])

    @property
    def effective_rank(self) -> int:
        return self.rank if self.active_rank is None else self.active_rank

    def keep_dense(self, weight: torch.Tensor) -> None:
        """Store the dense matrix beside the factors, for the budgets that serve it dense."""
        self.dense_weight = nn.Parameter(weight.detach().clone().to(self.A), requires_grad=self.A.requires_grad)

    @property
    def selection(self) -> int | None:
        """What the forward uses: the factors' prefix rank, or None for the stored dense matrix."""
        return None if self.dense_active else self.effective_rank

    def select(self, rank: int | None) -> None:
        """Use the first ``rank`` components of the factors, or (None) the stored dense matrix."""
        if rank is None and self.dense_weight is None:
            raise ValueError("this low-rank module stores no dense matrix to serve")
        self.dense_active = rank is None
        self.active_rank = rank

    # -- checkpoint spec: enough to rebuild the empty module before weights load --
    def spec(self) -> dict:
        spec = {
            "type": self.spec_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.bias is not None,
        }
        if self.curve_points:
            spec.update(curve_points=self.curve_points, active_rank=self.active_rank)
        if self.dense_weight is not None:
            spec.update(dense=True, dense_active=self.dense_active)
        return spec

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype | None = None, device=None) -> LowRankLinear:
        return cls(
            spec["in_features"],
            spec["out_features"],
            spec["rank"],
            spec["bias"],
            dtype=dtype,
            device=device,
            curve_points=spec.get("curve_points", 0),
            active_rank=spec.get("active_rank"),
            dense=spec.get("dense", False),
            dense_active=spec.get("dense_active", False),
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent A @ B at the active rank (materialised on demand; for analysis, not the forward)."""
        if self.dense_active:
            return self.dense_weight
        r = self.effective_rank
        return self.A[:, :r] @ self.B[:r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two thin matmuls: k(m+n) multiply-adds per token instead of m*n (fused Triton kernel on
        # CUDA, the PyTorch reference elsewhere). An elastic module uses the first active_rank
        # components: views of the factors, so switching budgets copies nothing.
        if self.dense_active:
            return nn.functional.linear(x, self.dense_weight, self.bias)
        if self.active_rank is None or self.active_rank == self.rank:
            return lowrank_linear(x, self.A, self.B, self.bias)
        return lowrank_linear(x, self.A[:, : self.active_rank], self.B[: self.active_rank], self.bias)

    def extra_repr(self) -> str:
        elastic = f", active_rank={self.selection or 'dense'}, elastic" if self.curve_points else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}{elastic}"
        )
