"""LOST: SVD split + channel-wise sparse residual, W ~= U_r V_r + S_c; optional training."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...modules import LowRankSparseLinear
from ...registry import register_method
from ..base import Method, Plan, Replacement, StageResult, check_linear, summarise_factors
from ..scaling import fit_weights
from .config import LostConfig
from .factorize import best_split, lowrank_sparse_factorize

INDEX_BYTES = 4  # sc_channels are int32


@dataclass(frozen=True)
class LostShape:
    rank: int
    channels: int
    budget: int = 0
    auto: bool = False  # the split is chosen per matrix in ``factor`` (rank/channels here: plain SVD)

    def params(self, m: int, n: int) -> int:
        return self.rank * (m + n) + self.channels * m


def lost_shape(m: int, n: int, reduction: float, sparse_fraction: float | str) -> LostShape | None:
    """(r, c) keeping at most (1 - reduction) m n values, ``sparse_fraction`` of them in S_c."""
    budget = int((1.0 - reduction) * m * n)
    auto = sparse_fraction == "auto"
    channels = 0 if auto else min(int(sparse_fraction * budget // m), n)
    rank = min((budget - channels * m) // (m + n), min(m, n))
    if rank < 1:
        return None
    if channels:  # spend what rounding left over on more channels
        channels = min(n, channels + (budget - channels * m - rank * (m + n)) // m)
    shape = LostShape(rank, channels, budget, auto)
    return shape if shape.params(m, n) < m * n else None


@register_method
class Lost(Method):
    name = "lost"
    config_class = LostConfig
    summary = "LOST: W ~= U V + channel-sparse S_c (SVD split + largest residual channels), optional training"

    def calibration(self, config: LostConfig):
        return config.scaling_calibration()

    def plan(self, modules: dict[str, nn.Module], config: LostConfig, planner) -> Plan:
        decisions, result = {}, StageResult(self.name)
        for name, module in modules.items():
            check_linear(self.name, name, module)
            m, n = module.out_features, module.in_features
            shape = lost_shape(m, n, config.reduction, config.sparse_fraction)
            decisions[name] = shape
            result.rows.append(
                {
                    "module": name,
                    "shape": f"{m}x{n}",
                    "rank": shape.rank if shape else None,
                    "channels": shape.channels if shape else None,
                    "replaced": shape is not None,
                    "params_before": m * n,
                    "params_after": shape.params(m, n) if shape else m * n,
                    "index_bytes": INDEX_BYTES * shape.channels if shape else 0,
                }
            )
        self.summarise(result, config)
        result.summary.update({"sparse_fraction": config.sparse_fraction, "scaling": config.scaling})
        return Plan(decisions, result)

    def apply(self, name, module: nn.Linear, config: LostConfig, shape: LostShape, stats) -> Replacement:
        weights = fit_weights(stats, config)
        m, n = module.out_features, module.in_features
        if shape.auto:
            rank, channels, _ = best_split(module.weight, shape.budget, **weights)
            shape = LostShape(rank, channels, shape.budget, True)
        f = lowrank_sparse_factorize(module.weight, shape.rank, shape.channels, config.refine_iters, **weights)
        weight = module.weight
        layer = LowRankSparseLinear.from_factors(
            f.U.to(weight.device, weight.dtype),
            f.V.to(weight.device, weight.dtype),
            f.sc_values.to(weight.device, weight.dtype),
            f.sc_channels.to(weight.device),
            module.bias,
        )
        return Replacement(
            layer,
            {
                "rel_error": f.error,
                "plain_rel_error": f.plain_error,
                "svd_rel_error": f.svd_error,
                "rank": shape.rank,
                "channels": shape.channels,
                "params_after": shape.params(m, n),
                "index_bytes": INDEX_BYTES * shape.channels,
            },
        )

    def summarise(self, result: StageResult, config: LostConfig) -> None:
        summarise_factors(result, config.reduction)  # apply may have refined a row (the automatic split)
