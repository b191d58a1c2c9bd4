"""What dsformer and lost share: the run loop (plan -> factor each module -> optional training),
activation scales, and the stage report.

Both are *model* methods: the one-shot factorisation is a per-module pure function (``apply``),
but the optional training step needs the whole model afterwards. ``run`` walks the modules in
decoder-layer order; with ``scaling: activation`` it goes through the shared sequential engine
(``compress.activations``) so each layer's statistics reflect the compressed layers before it.
"""
from __future__ import annotations

import re
import time

import torch
from torch import nn

from ...errors import CompressError
from ...targets import replace_module, select_modules
from ...utils import progress_iter
from ..base import StageResult


def fit_weights(stats: dict | None, config) -> dict:
    """Keyword arguments for the factorisers: ``scale`` (activation), ``cov`` (whiten) or nothing."""
    if config.scaling == "activation":
        return {"scale": input_scale(stats, config.alpha)}
    if config.scaling == "whiten":
        from .factorize import shrunk_covariance

        return {"cov": shrunk_covariance(stats["cov"], config.shrinkage)}
    return {}


def input_scale(stats: dict | None, alpha: float) -> torch.Tensor | None:
    """a_j = rms(x_j)^alpha, normalised to mean 1, floored at 1e-3 (dead channels keep some weight)."""
    if stats is None:
        return None
    rms = stats["cov"].diagonal().clamp_min(0).sqrt().to(torch.float64)
    scale = rms.pow(alpha)
    scale = scale / scale.mean().clamp_min(1e-30)
    return scale.clamp_min(1e-3)


def check_linear(method: str, name: str, module: nn.Module) -> None:
    if not isinstance(module, nn.Linear):
        raise CompressError(f"{method}: {name} is a {type(module).__name__}, not a Linear")


def summarise(result: StageResult, reduction: float) -> None:
    before = sum(r["params_before"] for r in result.rows)
    after = sum(r["params_after"] for r in result.rows)
    replaced = [r for r in result.rows if r["replaced"]]
    result.summary.update({
        "requested_reduction": reduction, "achieved_reduction": 1 - after / before if before else 0.0,
        "targeted_params_before": before, "targeted_params_after": after,
        "index_bytes": sum(r["index_bytes"] for r in result.rows),
        "replaced": len(replaced), "kept_dense": len(result.rows) - len(replaced),
    })


def names_regex(names) -> str:
    return "re:^(" + "|".join(re.escape(n) for n in names) + ")$"


def factor_modules(method, model: nn.Module, config, ctx, where: str) -> tuple[StageResult, dict[str, nn.Module]]:
    """Select, plan and replace the targeted modules; returns the report and {name: new module}."""
    modules = select_modules(model, config.targets, config.ignore, f"{where}.targets")
    decisions, result = method.plan(modules, config, ctx)
    chosen = {name: module for name, module in modules.items() if decisions.get(name) is not None}
    rows = {row["module"]: row for row in result.rows}
    made: dict[str, nn.Module] = {}

    def replace(name, module, stats):
        new, info = method.factor(name, module, config, decisions[name], stats)
        rows[name].update(info)
        replace_module(model, name, new)
        made[name] = new

    start = time.perf_counter()
    if chosen and config.scaling != "none":
        from ...activations import calibrate_sequentially

        def on_layer(index, layer_modules, stats):
            for name, module in layer_modules.items():
                replace(name, module, stats[name])

        windows = ctx.calibration_windows()
        if windows is not None:
            windows = windows[: config.scaling_windows]
        report = calibrate_sequentially(model, chosen, windows, on_layer,
                                        batch_size=config.calibration_batch_size)
        result.summary["calibration"] = {"layers": report.layers_calibrated, "tokens": report.tokens}
    else:
        for name, module in progress_iter(list(chosen.items()), f"{method.name}: factorise", ctx.progress):
            replace(name, module, None)
    result.summary["factorise_wall_time_s"] = time.perf_counter() - start
    summarise(result, config.reduction)  # factor() may have refined a row (e.g. lost's automatic split)
    errors = [rows[n] for n in made]
    if errors:
        result.summary["mean_rel_error"] = sum(r["rel_error"] for r in errors) / len(errors)
        result.summary["mean_svd_rel_error"] = sum(r["svd_rel_error"] for r in errors) / len(errors)
    return result, made


def train_factors(model: nn.Module, names: list[str], config, ctx) -> dict:
    """Train only the modules ``names`` with the finetune method's accelerate loop."""
    from ..finetune import Finetune, FinetuneConfig

    ft = FinetuneConfig(targets=[names_regex(names)], steps=config.steps, lr=config.lr, schedule=config.schedule,
                        warmup_steps=config.warmup_steps, batch_size=config.batch_size,
                        max_grad_norm=config.max_grad_norm, eval_windows=config.eval_windows, seed=config.seed)
    result = Finetune().run(model, ft, ctx)
    return {"summary": result.summary, "series": result.series}
