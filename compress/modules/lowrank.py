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

    Anchored (``anchors``: ``[(budget, rank), ...]``, ascending budgets): further factor sets, each fit for the
    model compressed at its budget and serving the budgets from there up to the next anchor's (the main
    factors ``A``, ``B`` serve those below the first). A selection is then ``(anchor, rank)`` for anchor >= 1
    (a view of that anchor's factors), a plain rank for the main factors, None for the dense weight.
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
        anchors: tuple[tuple[float, int], ...] = (),
        active_anchor: int = 0,
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
        self.set_anchors(
            [budget for budget, _ in anchors],
            [torch.empty(out_features, r, **factory) for _, r in anchors],
            [torch.empty(r, in_features, **factory) for _, r in anchors],
        )
        self.active_anchor = active_anchor

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
        """Make the module elastic: the estimated loss at ``ranks`` (ascending, from 0 to ``self.curve_rank``)."""
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
        """The estimated loss at every rank 0 .. ``self.curve_rank``: as stored, or linear between the stored points
        (checkpoints written before every rank was stored kept at most 257 of them)."""
        ranks, loss = self.curve_ranks.double().cpu(), self.curve_loss.double().cpu()
        if len(ranks) == self.curve_rank + 1:
            return loss
        grid = torch.arange(self.curve_rank + 1, dtype=torch.float64)
        upper = torch.searchsorted(ranks, grid).clamp(1, len(ranks) - 1)
        lo, hi = ranks[upper - 1], ranks[upper]
        t = ((grid - lo) / (hi - lo).clamp_min(1)).clamp(0, 1)
        return loss[upper - 1] + t * (loss[upper] - loss[upper - 1])

    @property
    def curve_rank(self) -> int:
        """The largest rank any of the stored factor sets serves: the curve covers 0 .. this."""
        return max([self.rank, *(A.shape[1] for A in self.anchor_A or [])])

    @property
    def effective_rank(self) -> int:
        return self.rank if self.active_rank is None else self.active_rank

    def keep_dense(self, weight: torch.Tensor) -> None:
        """Store the dense matrix beside the factors, for the budgets that serve it dense."""
        self.dense_weight = nn.Parameter(weight.detach().clone().to(self.A), requires_grad=self.A.requires_grad)

    def set_anchors(self, budgets: list[float], As: list[torch.Tensor], Bs: list[torch.Tensor]) -> None:
        """Store these anchors (ascending budgets) in place of any before; none: a plain module."""
        self.anchor_budgets = [float(budget) for budget in budgets]
        as_parameters = [nn.Parameter(t.detach(), requires_grad=self.A.requires_grad) for t in (*As, *Bs)]
        self.anchor_A = nn.ParameterList(as_parameters[: len(As)]) if budgets else None
        self.anchor_B = nn.ParameterList(as_parameters[len(As) :]) if budgets else None

    def add_anchor(self, budget: float, A: torch.Tensor, B: torch.Tensor) -> None:
        """Store factors of their own for the budgets from ``budget`` up to the next anchor's."""
        if self.anchor_budgets and budget <= self.anchor_budgets[-1]:
            raise ValueError("anchors are added in ascending budgets")
        As, Bs = list(self.anchor_A or []), list(self.anchor_B or [])
        self.set_anchors([*self.anchor_budgets, budget], [*As, A.to(self.A)], [*Bs, B.to(self.B)])

    def anchor_rank(self, anchor: int) -> int:
        """The stored rank of ``anchor`` (0: the main factors)."""
        return self.rank if anchor == 0 else self.anchor_A[anchor - 1].shape[1]

    @property
    def anchors(self) -> list[tuple[float, int]]:
        return [(budget, self.anchor_rank(j + 1)) for j, budget in enumerate(self.anchor_budgets)]

    def factors(self, anchor: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (A, B) of ``anchor`` (0: the main factors)."""
        return (self.A, self.B) if anchor == 0 else (self.anchor_A[anchor - 1], self.anchor_B[anchor - 1])

    @property
    def selection(self) -> int | tuple[int, int] | None:
        """What the forward uses: the main factors' prefix rank, ``(anchor, rank)`` for another anchor's, or None
        for the stored dense matrix."""
        if self.dense_active:
            return None
        return self.effective_rank if self.active_anchor == 0 else (self.active_anchor, self.active_rank)

    def select(self, selection: int | tuple[int, int] | None) -> None:
        """Use the first ``rank`` components of the main factors (an int) or of an anchor's (``(anchor, rank)``),
        or (None) the stored dense matrix."""
        if selection is None and self.dense_weight is None:
            raise ValueError("this low-rank module stores no dense matrix to serve")
        anchor, rank = selection if isinstance(selection, tuple) else (0, selection)
        if isinstance(selection, tuple) and rank is None:
            raise ValueError("an anchor's selection names its rank")
        if not 0 <= anchor <= len(self.anchor_budgets):
            raise ValueError(f"this low-rank module has no anchor {anchor}")
        if rank is not None and not 0 < rank <= self.anchor_rank(anchor):
            raise ValueError(f"rank {rank} is beyond the {self.anchor_rank(anchor)} stored for anchor {anchor}")
        self.dense_active = selection is None
        self.active_anchor = 0 if selection is None else anchor
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
        if self.anchor_budgets:
            spec.update(anchors=[list(anchor) for anchor in self.anchors], active_anchor=self.active_anchor)
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
            anchors=[tuple(anchor) for anchor in spec.get("anchors", [])],
            active_anchor=spec.get("active_anchor", 0),
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent A @ B at the active rank (materialised on demand; for analysis, not the forward)."""
        if self.dense_active:
            return self.dense_weight
        A, B = self.factors(self.active_anchor)
        r = self.effective_rank
        return A[:, :r] @ B[:r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two thin matmuls: k(m+n) multiply-adds per token instead of m*n (fused Triton kernel on
        # CUDA, the PyTorch reference elsewhere). An elastic module uses the first active_rank
        # components: views of the factors, so switching budgets copies nothing.
        if self.dense_active:
            return nn.functional.linear(x, self.dense_weight, self.bias)
        A, B = self.factors(self.active_anchor)
        if self.active_rank is None or self.active_rank == A.shape[1]:
            return lowrank_linear(x, A, B, self.bias)
        return lowrank_linear(x, A[:, : self.active_rank], B[: self.active_rank], self.bias)

    def extra_repr(self) -> str:
        elastic = f", selection={self.selection or 'dense'}, elastic" if self.curve_points else ""
        if self.anchor_budgets:
            elastic += f", anchors={self.anchors}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}{elastic}"
        )
