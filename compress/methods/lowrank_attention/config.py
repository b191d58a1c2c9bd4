from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..lowrank.config import LowRankConfig

Projection = Literal["q", "k", "v", "o"]


class LowRankAttentionConfig(LowRankConfig):
    """Factorise the attention projections (q/k/v/o) with the ``lowrank`` backends.

    Give either ``reduction`` (one global budget over the targeted projections; with
    ``allocation: sensitivity`` the ranks follow the measured sensitivities, so e.g. GQA's
    narrow k/v may keep more) or ``per_projection`` (a reduction per projection kind, e.g.
    ``{q: 0.6, k: 0.3, v: 0.3, o: 0.5}``). GQA-aware: k/v are (kv_heads * head_dim) x hidden,
    and ranks are computed from each matrix's own shape.

    ``kv_groups`` (Palu): factorise k/v per group of KV heads, one latent per group (G = 1 is
    the joint factorisation; G = the number of KV heads is per-head). Each k/v matrix keeps the
    parameter count its budget gave it: the per-group rank r_g satisfies
    r_g (G in + out) <= r (in + out).
    """

    method: Literal["lowrank_attention"] = "lowrank_attention"
    targets: list[str] = Field(default_factory=lambda: [r"re:.*\.self_attn\.(q|k|v|o)_proj$"], min_length=1)
    reduction: float | None = Field(None, gt=0, lt=1, description="global fraction of targeted parameters removed")
    per_projection: dict[Projection, float] | None = Field(
        None, description="fraction removed per projection kind (q/k/v/o); kinds not listed stay dense"
    )
    kv_groups: int = Field(
        1,
        ge=1,
        description="k/v: factorise each group of KV heads separately (Palu); it must "
        "divide the model's num_key_value_heads",
    )

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.reduction is None) == (self.per_projection is None):
            raise ValueError("give exactly one of 'reduction' or 'per_projection'")
        if self.per_projection is not None:
            bad = {k: v for k, v in self.per_projection.items() if not 0 < v < 1}
            if bad:
                raise ValueError(f"per_projection reductions must be in (0, 1): {bad}")
            if self.allocation != "uniform":
                raise ValueError("per_projection fixes the ranks; use allocation: uniform")
        if self.elastic is not None and self.kv_groups > 1:
            raise ValueError("elastic ranks are for joint factorisations; use kv_groups: 1")
        return self
