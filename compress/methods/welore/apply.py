"""WeLore: global threshold tau on normalised spectra; LRCs factorised, N-LRCs stay dense.

Unlike the reference code we (a) find tau for any model by bisection on a *parameter*
budget instead of hard-coded taus, (b) count compression as parameters removed, not
singular values dropped, and (c) run on whatever device holds the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import CompressError
from ...lowrank_math import breakeven_rank, lowrank_params, normalised_spectrum, truncated_svd_factors
from ...modules import LowRankLinear
from ...registry import register_method
from ..base import Method, Plan, Replacement, StageResult, budget_summary, check_linear
from .config import WeLoreConfig


@dataclass(frozen=True)
class MatrixSpectrum:
    out_features: int
    in_features: int
    spectrum: torch.Tensor  # normalised, descending

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    def rank_at(self, tau: float) -> int:
        """Ranks kept = full rank - #{s' < tau}."""
        return int((self.spectrum >= tau).sum())

    def decision(self, tau: float, min_ratio: float) -> int | None:
        """Rank to keep, or None when the matrix stays dense (N-LRC or no parameter saving)."""
        full = self.spectrum.numel()
        rank = max(1, self.rank_at(tau))
        if (full - rank) / full < min_ratio or rank > breakeven_rank(self.out_features, self.in_features):
            return None
        return rank

    def params(self, rank: int | None) -> int:
        return self.dense_params if rank is None else lowrank_params(self.out_features, self.in_features, rank)


def total_params(spectra: dict[str, MatrixSpectrum], tau: float, min_ratio: float) -> int:
    return sum(s.params(s.decision(tau, min_ratio)) for s in spectra.values())


def find_tau(spectra: dict[str, MatrixSpectrum], reduction: float, min_ratio: float, iters: int = 60) -> float:
    """Smallest tau whose parameter count drops by at least ``reduction`` (params fall as tau grows)."""
    dense = sum(s.dense_params for s in spectra.values())
    goal = (1.0 - reduction) * dense
    if total_params(spectra, 1.0, min_ratio) > goal:
        best = 1 - total_params(spectra, 1.0, min_ratio) / dense
        raise CompressError(
            f"reduction {reduction:.2f} is out of reach for these targets "
            f"(the most WeLore can remove here is {best:.3f})"
        )
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if total_params(spectra, mid, min_ratio) <= goal:
            hi = mid
        else:
            lo = mid
    return hi


@register_method
class WeLore(Method):
    name = "welore"
    config_class = WeLoreConfig
    summary = "WeLore: global threshold on normalised singular spectra; low-rank components factorised"

    def plan(self, modules, config: WeLoreConfig, planner) -> Plan:
        spectra = {}
        for name, module in planner.progress(modules.items(), "welore: spectra"):
            check_linear(self.name, name, module)
            spectra[name] = MatrixSpectrum(module.out_features, module.in_features, normalised_spectrum(module.weight))
        tau = (
            config.threshold if config.threshold is not None else find_tau(spectra, config.reduction, config.min_ratio)
        )
        decisions = {name: s.decision(tau, config.min_ratio) for name, s in spectra.items()}

        result = StageResult(self.name)
        for name, s in spectra.items():
            rank = decisions[name]
            result.rows.append(
                {
                    "module": name,
                    "shape": f"{s.out_features}x{s.in_features}",
                    "rank": rank if rank is not None else min(s.out_features, s.in_features),
                    "full_rank": min(s.out_features, s.in_features),
                    "kind": "LRC" if rank is not None else "N-LRC",
                    "params_before": s.dense_params,
                    "params_after": s.params(rank),
                }
            )
        result.summary = {
            "tau": tau,
            **budget_summary(result.rows, config.reduction),
            "lrc": sum(r is not None for r in decisions.values()),
            "n_lrc": sum(r is None for r in decisions.values()),
        }
        result.series = {"spectra": {name: s.spectrum.float().tolist() for name, s in spectra.items()}}
        return Plan(decisions, result)

    def apply(self, name, module: nn.Linear, config, rank, stats) -> Replacement:
        A, B = truncated_svd_factors(module.weight, rank)
        return Replacement(LowRankLinear.from_factors(A, B, module.bias))
