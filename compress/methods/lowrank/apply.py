"""Uniform-rank truncated SVD: every targeted matrix loses the same fraction of parameters."""
from __future__ import annotations

from torch import nn

from ...errors import CompressError
from ...lowrank_math import lowrank_params, rank_for_reduction, truncated_svd_factors
from ...modules import LowRankLinear
from ...registry import register_method
from ..base import ModuleMethod, StageResult
from .config import LowRankConfig


@register_method
class LowRank(ModuleMethod):
    name = "lowrank"
    config_class = LowRankConfig
    summary = "truncated SVD at a uniform per-matrix parameter reduction (the plain baseline)"

    def plan(self, modules, config: LowRankConfig, ctx):
        decisions, result = {}, StageResult(self.name)
        for name, module in modules.items():
            if not isinstance(module, nn.Linear):
                raise CompressError(f"lowrank: {name} is a {type(module).__name__}, not a Linear")
            m, n = module.out_features, module.in_features
            rank = rank_for_reduction(m, n, config.reduction)
            decisions[name] = rank
            result.rows.append({"module": name, "shape": f"{m}x{n}", "rank": rank, "full_rank": min(m, n),
                                "kind": "LRC", "params_before": m * n, "params_after": lowrank_params(m, n, rank)})
        before = sum(r["params_before"] for r in result.rows)
        after = sum(r["params_after"] for r in result.rows)
        result.summary = {"requested_reduction": config.reduction, "achieved_reduction": 1 - after / before,
                          "targeted_params_before": before, "targeted_params_after": after}
        return decisions, result

    def apply(self, name, module: nn.Linear, config, rank, stats):
        A, B = truncated_svd_factors(module.weight, rank)
        return LowRankLinear.from_factors(A, B, module.bias)
