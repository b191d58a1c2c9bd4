"""Low-rank attention: the ``lowrank`` machinery on q/k/v/o with per-projection or global budgets.

Not yet: Palu-style per-head-group factorisation of k/v (a cacheable latent per KV group)
needs a grouped low-rank module type; today each projection gets one shared latent.
"""
from __future__ import annotations

import re

from ...errors import CompressError
from ...lowrank_math import lowrank_params, rank_for_reduction
from ...registry import register_method
from ..base import StageResult
from ..lowrank.apply import LowRank
from .config import LowRankAttentionConfig

_KIND = re.compile(r"(?:^|\.)([qkvo])_proj$")


@register_method
class LowRankAttention(LowRank):
    name = "lowrank_attention"
    config_class = LowRankAttentionConfig
    summary = "low-rank q/k/v/o projections (GQA-aware shapes; per-projection or global budget)"

    def plan(self, modules, config: LowRankAttentionConfig, ctx):
        if config.per_projection is None:
            return super().plan(modules, config, ctx)
        decisions, result = {}, StageResult(self.name)
        for name, module in modules.items():
            match = _KIND.search(name)
            if match is None:
                raise CompressError(f"lowrank_attention: cannot tell which projection {name!r} is (q/k/v/o_proj)")
            m, n = module.out_features, module.in_features
            reduction = config.per_projection.get(match.group(1))
            rank = None if reduction is None else rank_for_reduction(m, n, reduction)
            decisions[name] = rank
            result.rows.append({"module": name, "shape": f"{m}x{n}", "rank": rank, "full_rank": min(m, n),
                                "kind": "LRC" if rank else "dense", "params_before": m * n,
                                "params_after": m * n if rank is None else lowrank_params(m, n, rank)})
        before = sum(r["params_before"] for r in result.rows)
        after = sum(r["params_after"] for r in result.rows)
        result.summary = {"requested_reduction": None, "per_projection": dict(config.per_projection),
                          "achieved_reduction": 1 - after / before, "targeted_params_before": before,
                          "targeted_params_after": after, "backend": config.backend,
                          "lrc": sum(r["rank"] is not None for r in result.rows)}
        return decisions, result
