"""Low-rank factorisation of targeted Linears with shared decomposition backends.

``backend`` (see ``compress.lowrank_math``): ``svd`` is data-free (no forward pass); ``asvd``,
``whiten`` and ``whiten_dense_target`` declare the statistics they need and receive each module's
input statistics as ``stats``, layer by layer. ``allocation: sensitivity`` chooses per-matrix ranks
under the global budget from Fisher-weighted output-error curves the plan asks the pipeline to
measure on calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import CompressError
from ...lowrank_math import (
    Whitening,
    allocate_ranks,
    asvd_factors,
    breakeven_rank,
    lowrank_params,
    rank_for_reduction,
    refine_factors,
    truncated_svd_factors,
    truncation_error_profile,
    whitened_factors,
)
from ...modules import LowRankLinear
from ...registry import register_method
from ..base import Calibration, Method, Plan, Replacement, StageResult, budget_summary, check_linear
from .config import LowRankConfig


def factorise(
    weight: torch.Tensor,
    rank: int,
    backend: str,
    stats: dict | None,
    *,
    alpha: float = 0.5,
    shrinkage: float = 0.0,
    refine: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A, B) of ``weight`` at ``rank`` with one backend (float64)."""
    if backend == "svd":
        A, B = truncated_svd_factors(weight.detach().to(torch.float64), rank)
    else:
        if stats is None:
            raise CompressError(f"lowrank backend {backend!r} needs activation statistics")
        if backend == "asvd":
            A, B = asvd_factors(weight, stats["abs_mean"], rank, alpha)
        elif backend in ("whiten", "whiten_dense_target"):
            whitening = _whitening(stats, shrinkage, keep_cov=refine)
            A, B = whitened_factors(weight, whitening, rank, shrinkage=shrinkage, **_dense_target(stats, backend))
        else:
            raise CompressError(f"unknown lowrank backend {backend!r}")
    if refine:
        if stats is None:
            raise CompressError("lowrank refine needs activation statistics")
        crosses = {"cross": stats.get("cross"), "target_cross": stats.get("target_cross")}
        A, B = refine_factors(weight, A, B, stats["cov"], shrinkage=shrinkage, **crosses)
    return A, B


def _dense_target(stats: dict, backend: str) -> dict:
    """The cross moment the dense-target backend fits, in the form the engine measured it (``cross`` = C_dc, or
    ``target_cross`` = W C_dc for a module with fewer outputs than inputs); none for the other backends."""
    if backend != "whiten_dense_target":
        return {}
    return {"cross": stats.get("cross"), "target_cross": stats.get("target_cross")}


def _whitening(stats: dict, shrinkage: float, keep_cov: bool) -> Whitening:
    """The input's :class:`Whitening`, computed by the first module that reads these statistics and kept in
    them for the others (q/k/v share one input). The covariance is given up for it (factorised in its own
    storage: at 7B shapes 1 GB less) unless a later step reads it (``keep_cov``: refine)."""
    if "whitening" not in stats:
        cov = stats["cov"] if keep_cov else stats.pop("cov")
        stats["whitening"] = Whitening.of(cov, shrinkage, consume=not keep_cov)
    return stats["whitening"]


def sensitivity_curves(
    modules: dict[str, nn.Linear], config: LowRankConfig, planner
) -> dict[str, tuple[int, int, torch.Tensor]]:
    """Per-matrix estimated loss increase (nats/token) at every rank, on dense calibration statistics."""
    windows = planner.windows(config.sensitivity_windows)
    backend = "whiten" if config.backend == "whiten_dense_target" else config.backend

    def curve(name, module, stats, fisher):
        loss = 0.5 * truncation_error_profile(
            module.weight,
            stats.get("cov"),
            fisher,
            backend=backend,
            abs_mean=stats["abs_mean"],
            alpha=config.alpha,
            shrinkage=config.shrinkage,
            output_cov=stats.get("output_cov"),
            input_power=stats.get("input_power"),
        )
        return module.out_features, module.in_features, loss.cpu()

    # the sensitivity pass's batches: half the calibration's (a backward pass holds more per window)
    batch_size = max(1, config.calibration_batch_size // 2)
    # the curves read each input covariance only as W C W^T and its diagonal
    return planner.map_sensitivity_statistics(modules, curve, windows, batch_size=batch_size, output_side=True)


@register_method
class LowRank(Method):
    name = "lowrank"
    config_class = LowRankConfig
    summary = "truncated factorisation (svd / asvd / whitening / dense-target whitening) under a parameter budget"

    def calibration(self, config: LowRankConfig) -> Calibration:
        data_free = config.backend == "svd" and not config.refine
        dense_target = config.backend == "whiten_dense_target" or config.refine
        # data-free still runs the stream when layer-local training (train: {scope: layer}) needs it
        return Calibration(
            statistics="none" if data_free else "dense_cross" if dense_target else "input_cov",
            sequential=config.sequential,
            sublayer=config.sublayer,
            windows=config.calibration_windows,
            batch_size=config.calibration_batch_size,
            output_side=True,  # the factorisations read the cross moment only as W C_dc
        )

    def streams(self, config: LowRankConfig) -> bool:
        # sensitivity curves stream too (compress.activations.sensitivity_walk); global training does not
        return config.train is None or config.train.scope == "layer"

    def plan(self, modules, config: LowRankConfig, planner) -> Plan:
        result = StageResult(self.name)
        for name, module in modules.items():
            check_linear(self.name, name, module)
        curves = None
        if config.elastic is not None:
            curves = sensitivity_curves(modules, config, planner)
            return elastic_plan(modules, config, curves, result)
        if config.allocation == "sensitivity":
            curves = sensitivity_curves(modules, config, planner)
            decisions = allocate_ranks(curves, config.reduction)
        else:
            decisions = {
                name: rank_for_reduction(m.out_features, m.in_features, config.reduction) for name, m in modules.items()
            }
        for name, module in modules.items():
            m, n = module.out_features, module.in_features
            rank = decisions[name]
            row = {
                "module": name,
                "shape": f"{m}x{n}",
                "rank": rank,
                "full_rank": min(m, n),
                "kind": "LRC" if rank is not None else "dense",
                "params_before": m * n,
                "params_after": m * n if rank is None else lowrank_params(m, n, rank),
            }
            if curves is not None:
                row["est_loss_increase"] = float(curves[name][2][rank]) if rank is not None else 0.0
            result.rows.append(row)
        result.summary = {
            **budget_summary(result.rows, config.reduction),
            "backend": config.backend,
            "allocation": config.allocation,
            "lrc": sum(r["rank"] is not None for r in result.rows),
        }
        if curves is not None:
            result.summary["est_loss_increase"] = sum(r["est_loss_increase"] for r in result.rows)
        return Plan(decisions, result)

    def apply(self, name, module: nn.Linear, config: LowRankConfig, rank, stats) -> Replacement:
        elastic = rank if isinstance(rank, ElasticDecision) else None
        rank = elastic.stored_rank if elastic else rank
        if elastic is not None and elastic.segments:
            A, B = nested_factors(module.weight, elastic.segments, stats, config)
        else:
            A, B = factorise(
                module.weight,
                rank,
                config.backend,
                stats,
                alpha=config.alpha,
                shrinkage=config.shrinkage,
                refine=config.refine,
            )
        dtype = module.weight.dtype
        layer = LowRankLinear.from_factors(A.to(dtype), B.to(dtype), module.bias)
        if elastic is not None:  # the factors come ordered by importance: every prefix is the best of its rank
            for j, (budget, anchor_rank) in enumerate(elastic.anchors):  # each on its own budget's stream
                a, b = factorise(
                    module.weight,
                    anchor_rank,
                    config.backend,
                    stats["variants"][j],
                    alpha=config.alpha,
                    shrinkage=config.shrinkage,
                )
                layer.add_anchor(budget, a.to(dtype), b.to(dtype))
            layer.set_curve(torch.arange(rank + 1), elastic.curve[: rank + 1])
            if elastic.keep_dense:
                layer.keep_dense(module.weight)
            layer.select(elastic.active_rank)
        return Replacement(layer)


@dataclass(frozen=True)
class ElasticDecision:
    stored_rank: int  # the largest rank any budget of the range uses
    active_rank: int | None  # the rank at the stage's own reduction (None: served dense)
    curve: torch.Tensor  # estimated loss at every rank
    keep_dense: bool  # some budget of the range serves the dense matrix
    # (end rank, stream) of each range of the stored ranks, in order; stream 0 is the main calibration stream,
    # j the plan's stream_selections[j - 1] (one range: every rank fit on the main, or pooled, statistics)
    segments: tuple[tuple[int, int], ...] = ()
    # (budget, rank) of each anchor: factors of its own, fit on that budget's stream (the plan's
    # stream_selections[j]), serving the budgets from it up to the next anchor's
    anchors: tuple[tuple[float, int], ...] = ()


def nested_segments(ranks: list[int | None], stored: int) -> tuple[tuple[int, int], ...]:
    """The ranges of a matrix's stored ranks and the stream each is fit on, given its rank at each calibrated
    budget (``ranks[j]``: stream j's; None: dense there): the smallest rank's range on its budget's stream, each
    larger rank's range on its own, the last range extended to the stored rank."""
    segments: list[tuple[int, int]] = []
    for rank, stream in sorted((r, j) for j, r in enumerate(ranks) if r is not None):
        if rank > (segments[-1][0] if segments else 0):
            segments.append((rank, stream))
    if not segments:  # dense at every calibrated budget: its factors serve only budgets past them
        return ((stored, 0),)
    segments[-1] = (stored, segments[-1][1])
    return tuple(segments)


def nested_factors(weight: torch.Tensor, segments, stats: dict, config: LowRankConfig):
    """Factors built range by range (:func:`nested_segments`): each range is the best extension of the ranges
    before it on its own stream's statistics (``whitened_factors(fixed=...)``), so a budget whose ranks end
    in a range is served by factors fit to the inputs its own compressed layers give."""
    streams = [stats, *stats.get("variants", [])]
    A = B = None
    start = 0
    for end, j in segments:
        s = streams[j]
        a, b = whitened_factors(
            weight,
            _whitening(s, config.shrinkage, keep_cov=False),
            end - start,
            shrinkage=config.shrinkage,
            fixed=None if A is None else (A, B),
            **_dense_target(s, config.backend),
        )
        A, B = (a, b) if A is None else (torch.cat([A, a], dim=1), torch.cat([B, b], dim=0))
        start = end
    return A, B


def as_stored(curves: dict) -> dict:
    """The curves as an elastic checkpoint stores them (every rank, float32): the allocation of the starting
    budget and of every calibrated one runs on these, so that a resize, which has only what is stored,
    allocates those budgets exactly as the compression did."""
    return {name: (m, n, loss.float().double()) for name, (m, n, loss) in curves.items()}


def stored_ranks(modules, curves, min_reduction: float) -> tuple[dict[str, int], set[str]]:
    """What to store so that every budget from ``min_reduction`` up can be served as a single-budget run would
    serve it: each matrix's rank at ``min_reduction`` (larger reductions use prefixes of it); a matrix that
    budget keeps dense stores its dense weight (the names returned) and factors at its largest rank that still
    saves parameters, for the larger budgets that factorise it. (The allocation removes a fraction in
    [min_reduction - tolerance, min_reduction], so that min_reduction itself can be served.)"""
    tolerance = min(0.005, min_reduction / 2)
    allocation = allocate_ranks(curves, min_reduction - tolerance, tolerance=tolerance)
    dense = {name for name, rank in allocation.items() if rank is None}
    ranks = {
        name: rank or breakeven_rank(modules[name].out_features, modules[name].in_features)
        for name, rank in allocation.items()
    }
    return ranks, dense


def elastic_plan(modules, config: LowRankConfig, curves, result: StageResult) -> Plan:
    """Store each matrix at its rank for ``elastic.min_reduction`` (a matrix that budget keeps dense: its dense
    weight and its largest rank that still saves parameters); start at the allocation of ``reduction``."""
    stored, dense = stored_ranks(modules, curves, config.elastic.min_reduction)
    curves = as_stored(curves)
    active = allocate_ranks(curves, config.reduction, allow_dense=dense, max_ranks=stored)
    nested, anchored = config.elastic.fit == "nested", config.elastic.fit == "anchored"
    budgets = [b for b in config.elastic.calibrate_on if b != config.reduction]
    if anchored:  # anchor j (from 1) is stream j - 1: ascending budgets
        budgets = sorted(set(budgets))
    selections = [allocate_ranks(curves, budget, allow_dense=dense, max_ranks=stored) for budget in budgets]
    # an anchor stores each matrix at its rank there; one its budget keeps dense, at the main factors' rank (the
    # budgets up to the next anchor may factorise it)
    anchors = {
        name: tuple((b, s[name] or stored[name]) for b, s in zip(budgets, selections)) if anchored else ()
        for name in modules
    }
    if anchored:  # each anchor's stream runs the layers before it through that anchor's own factors
        selections = [
            {name: None if rank is None else (j, rank) for name, rank in s.items()}
            for j, s in enumerate(selections, start=1)
        ]
    decisions = {
        name: ElasticDecision(
            stored[name],
            active[name],
            curves[name][2],
            name in dense,
            nested_segments([active[name], *[s[name] for s in selections]], stored[name]) if nested else (),
            anchors[name],
        )
        for name in modules
    }
    for name, module in modules.items():
        m, n = module.out_features, module.in_features
        rank = active[name]
        result.rows.append(
            {
                "module": name,
                "shape": f"{m}x{n}",
                "rank": rank,
                "full_rank": min(m, n),
                "stored_rank": stored[name],
                "stored_dense": name in dense,
                "kind": "LRC" if rank is not None else "dense",
                "params_before": m * n,
                "params_after": m * n if rank is None else lowrank_params(m, n, rank),
                "params_stored": lowrank_params(m, n, stored[name])
                + (m * n if name in dense else 0)
                + sum(lowrank_params(m, n, r) for _, r in anchors[name]),
                "est_loss_increase": float(curves[name][2][rank]) if rank is not None else 0.0,
            }
        )
    result.summary = {
        **budget_summary(result.rows, config.reduction),
        "backend": config.backend,
        "allocation": config.allocation,
        "lrc": sum(r["rank"] is not None for r in result.rows),
        "stored_dense": len(dense),
        "elastic_range": [config.elastic.min_reduction, config.elastic.max_reduction],
        "targeted_params_stored": sum(r["params_stored"] for r in result.rows),
        "est_loss_increase": sum(r["est_loss_increase"] for r in result.rows),
        "calibrated_on": [config.reduction, *budgets],
        "calibration_fit": config.elastic.fit,
    }
    return Plan(decisions, result, selections, streams_pooled=config.elastic.fit == "pooled")
