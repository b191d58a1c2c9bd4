"""Low-rank factorisation of targeted Linears with shared decomposition backends.

``backend`` (see ``compress.lowrank_math``): ``svd`` is data-free and keeps the old fast
path; ``asvd``, ``whiten`` and ``whiten_dense_target`` calibrate layer by layer through the
pipeline's sequential engine (``compress.activations``) and receive the layer's input
statistics as ``stats``. ``allocation: sensitivity`` chooses per-matrix ranks under the global
budget from Fisher-weighted output-error curves measured on calibration data (``plan``).
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import CompressError
from ...lowrank_math import (allocate_ranks, asvd_factors, lowrank_params, rank_for_reduction, refine_factors,
                             truncated_svd_factors, truncation_error_profile, whitened_factors)
from ...modules import LowRankLinear
from ...registry import register_method
from ..base import ModuleMethod, StageResult
from .config import LowRankConfig


def factorise(weight: torch.Tensor, rank: int, backend: str, stats: dict | None, *, alpha: float = 0.5,
              shrinkage: float = 0.0, refine: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A, B) of ``weight`` at ``rank`` with one backend (float64)."""
    if backend == "svd":
        A, B = truncated_svd_factors(weight.detach().to(torch.float64), rank)
    else:
        if stats is None:
            raise CompressError(f"lowrank backend {backend!r} needs activation statistics")
        if backend == "asvd":
            A, B = asvd_factors(weight, stats["abs_mean"], rank, alpha)
        elif backend == "whiten":
            A, B = whitened_factors(weight, stats["cov"], rank, shrinkage=shrinkage)
        elif backend == "whiten_dense_target":
            A, B = whitened_factors(weight, stats["cov"], rank, cross=stats.get("cross"), shrinkage=shrinkage)
        else:
            raise CompressError(f"unknown lowrank backend {backend!r}")
    if refine:
        if stats is None:
            raise CompressError("lowrank refine needs activation statistics")
        A, B = refine_factors(weight, A, B, stats["cov"], cross=stats.get("cross"), shrinkage=shrinkage)
    return A, B


def output_fisher(model: nn.Module, modules: dict[str, nn.Module], windows: torch.Tensor,
                  batch_size: int = 2) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the summed token loss w.r.t. each module's output, per channel."""
    sums = {name: None for name in modules}
    counts = {name: 0 for name in modules}
    handles = []

    def hook(name):
        def forward_hook(module, args, output):
            if output.requires_grad:
                def grad_hook(g):
                    g2 = g.detach().to(torch.float64).pow(2).reshape(-1, g.shape[-1])
                    sums[name] = g2.sum(0) if sums[name] is None else sums[name] + g2.sum(0)
                    counts[name] += g2.shape[0]
                output.register_hook(grad_hook)
        return forward_hook

    for name, module in modules.items():
        handles.append(module.register_forward_hook(hook(name)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        embed = model.get_input_embeddings()
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            with torch.enable_grad():
                embeds = embed(batch).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, use_cache=False).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         batch[:, 1:].reshape(-1), reduction="sum")
                torch.autograd.grad(loss, embeds)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [n for n, s in sums.items() if s is None]
    if missing:
        raise CompressError(f"sensitivity: no gradient reached {missing[:3]}")
    return {name: sums[name] / counts[name] for name in modules}


def sensitivity_curves(model: nn.Module, modules: dict[str, nn.Linear], config: LowRankConfig,
                       windows: torch.Tensor) -> dict[str, tuple[int, int, torch.Tensor]]:
    """Per-matrix estimated loss increase (nats/token) at every rank, on dense calibration statistics."""
    from ...activations import calibrate_sequentially

    fisher = output_fisher(model, modules, windows, batch_size=max(1, config.calibration_batch_size // 2))
    curves = {}
    backend = "whiten" if config.backend == "whiten_dense_target" else config.backend

    def on_layer(index, layer_modules, stats):
        for name, module in layer_modules.items():
            loss = 0.5 * truncation_error_profile(module.weight, stats[name]["cov"], fisher[name], backend=backend,
                                                  abs_mean=stats[name]["abs_mean"], alpha=config.alpha,
                                                  shrinkage=config.shrinkage)
            curves[name] = (module.out_features, module.in_features, loss.cpu())

    calibrate_sequentially(model, modules, windows, on_layer, sequential=False,
                           batch_size=config.calibration_batch_size)
    return curves


@register_method
class LowRank(ModuleMethod):
    name = "lowrank"
    config_class = LowRankConfig
    summary = "truncated factorisation (svd / asvd / whitening / dense-target whitening) under a parameter budget"

    def needs_activations_for(self, config: LowRankConfig) -> bool:
        return config.backend != "svd" or config.refine

    def activation_options(self, config: LowRankConfig) -> dict:
        cross = config.sequential and (config.backend == "whiten_dense_target" or config.refine)
        return {"sequential": config.sequential, "sublayer": config.sublayer, "cross": cross,
                "batch_size": config.calibration_batch_size}

    def plan(self, modules, config: LowRankConfig, ctx):
        decisions, result = {}, StageResult(self.name)
        for name, module in modules.items():
            if not isinstance(module, nn.Linear):
                raise CompressError(f"lowrank: {name} is a {type(module).__name__}, not a Linear")
        curves = None
        if config.allocation == "sensitivity":
            model = ctx.extras.get("model")
            if model is None:
                raise CompressError("lowrank allocation 'sensitivity' needs the model (run it through the pipeline)")
            windows = ctx.calibration_windows()
            if windows is None:
                raise CompressError("lowrank allocation 'sensitivity' needs calibration windows")
            curves = sensitivity_curves(model, modules, config, windows[: config.sensitivity_windows])
            decisions = allocate_ranks(curves, config.reduction)
        else:
            decisions = {name: rank_for_reduction(m.out_features, m.in_features, config.reduction)
                         for name, m in modules.items()}
        for name, module in modules.items():
            m, n = module.out_features, module.in_features
            rank = decisions[name]
            row = {"module": name, "shape": f"{m}x{n}", "rank": rank, "full_rank": min(m, n),
                   "kind": "LRC" if rank is not None else "dense", "params_before": m * n,
                   "params_after": m * n if rank is None else lowrank_params(m, n, rank)}
            if curves is not None:
                row["est_loss_increase"] = float(curves[name][2][rank]) if rank is not None else 0.0
            result.rows.append(row)
        before = sum(r["params_before"] for r in result.rows)
        after = sum(r["params_after"] for r in result.rows)
        result.summary = {"requested_reduction": config.reduction, "achieved_reduction": 1 - after / before,
                          "targeted_params_before": before, "targeted_params_after": after,
                          "backend": config.backend, "allocation": config.allocation,
                          "lrc": sum(r["rank"] is not None for r in result.rows)}
        if curves is not None:
            result.summary["est_loss_increase"] = sum(r["est_loss_increase"] for r in result.rows)
        return decisions, result

    def apply(self, name, module: nn.Linear, config: LowRankConfig, rank, stats):
        A, B = factorise(module.weight, rank, config.backend, stats, alpha=config.alpha,
                         shrinkage=config.shrinkage, refine=config.refine)
        dtype = module.weight.dtype
        return LowRankLinear.from_factors(A.to(dtype), B.to(dtype), module.bias)
