"""Low-rank attention: the ``lowrank`` machinery on q/k/v/o with per-projection or global budgets.

With ``kv_groups > 1`` the k/v projections become GroupedLowRankLinear (Palu): each group of KV
heads gets its own latent, factorised with the same backend on its rows (every backend's
objective separates over output rows, and the input statistics are shared by all groups).
"""

from __future__ import annotations

import re

from ...errors import CompressError
from ...lowrank_math import lowrank_params, rank_for_reduction
from ...modules import GroupedLowRankLinear
from ...registry import register_method
from ..base import Plan, Replacement, StageResult, budget_summary
from ..lowrank.apply import LowRank, factorise
from .config import LowRankAttentionConfig

_KIND = re.compile(r"(?:^|\.)([qkvo])_proj$")


@register_method
class LowRankAttention(LowRank):
    name = "lowrank_attention"
    config_class = LowRankAttentionConfig
    summary = "low-rank q/k/v/o projections (GQA-aware shapes; per-projection or global budget)"

    def plan(self, modules, config: LowRankAttentionConfig, planner) -> Plan:
        plan = self._plan_joint(modules, config, planner)
        decisions, result = plan.decisions, plan.result
        if config.kv_groups > 1:
            _check_groups(planner.model_config, config.kv_groups)
            for row in result.rows:
                name = row["module"]
                if decisions[name] is None or _KIND.search(name).group(1) not in "kv":
                    continue
                m, n = modules[name].out_features, modules[name].in_features
                decisions[name] = group_rank(m, n, decisions[name], config.kv_groups)
                row.update(
                    {
                        "rank": decisions[name],
                        "groups": config.kv_groups,
                        "params_after": grouped_params(m, n, decisions[name], config.kv_groups),
                    }
                )
            after = sum(r["params_after"] for r in result.rows)
            result.summary.update(
                {
                    "kv_groups": config.kv_groups,
                    "targeted_params_after": after,
                    "achieved_reduction": 1 - after / result.summary["targeted_params_before"],
                }
            )
        return plan

    def apply(self, name, module, config: LowRankAttentionConfig, rank, stats) -> Replacement:
        if config.kv_groups == 1 or _KIND.search(name).group(1) not in "kv":
            return super().apply(name, module, config, rank, stats)
        dtype = module.weight.dtype
        factors = [
            factorise(
                rows, rank, config.backend, stats, alpha=config.alpha, shrinkage=config.shrinkage, refine=config.refine
            )
            for rows in module.weight.chunk(config.kv_groups)
        ]
        return Replacement(
            GroupedLowRankLinear.from_factors([(A.to(dtype), B.to(dtype)) for A, B in factors], module.bias)
        )

    def _plan_joint(self, modules, config: LowRankAttentionConfig, planner) -> Plan:
        if config.per_projection is None:
            return super().plan(modules, config, planner)
        decisions, result = {}, StageResult(self.name)
        for name, module in modules.items():
            match = _KIND.search(name)
            if match is None:
                raise CompressError(f"lowrank_attention: cannot tell which projection {name!r} is (q/k/v/o_proj)")
            m, n = module.out_features, module.in_features
            reduction = config.per_projection.get(match.group(1))
            rank = None if reduction is None else rank_for_reduction(m, n, reduction)
            decisions[name] = rank
            result.rows.append(
                {
                    "module": name,
                    "shape": f"{m}x{n}",
                    "rank": rank,
                    "full_rank": min(m, n),
                    "kind": "LRC" if rank else "dense",
                    "params_before": m * n,
                    "params_after": m * n if rank is None else lowrank_params(m, n, rank),
                }
            )
        result.summary = {
            **budget_summary(result.rows, None),
            "per_projection": dict(config.per_projection),
            "backend": config.backend,
            "lrc": sum(r["rank"] is not None for r in result.rows),
        }
        return Plan(decisions, result)


def grouped_params(out_features: int, in_features: int, rank: int, groups: int) -> int:
    return rank * (groups * in_features + out_features)


def group_rank(out_features: int, in_features: int, joint_rank: int, groups: int) -> int:
    """The largest per-group rank that costs no more than the joint rank's parameters (at least 1)."""
    budget = lowrank_params(out_features, in_features, joint_rank)
    rank = budget // (groups * in_features + out_features)
    return max(1, min(rank, out_features // groups, in_features))


def _check_groups(model_config, groups: int) -> None:
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    heads = getattr(model_config, "num_key_value_heads", None)
    if heads is None:
        raise CompressError("lowrank_attention kv_groups needs a model config with num_key_value_heads")
    if heads % groups:
        raise CompressError(f"lowrank_attention: kv_groups={groups} does not divide the model's {heads} KV heads")
