"""Apply a recipe's stages to a model, one stage after another.

Module methods are applied module by module in the model's own order, which is decoder
layer order: layer i is finished before layer i+1 is touched, so methods that calibrate
on activations (layer i seeing the already-compressed layers before it) slot in here
without changing the shape of the loop.
"""
from __future__ import annotations

import time

from torch import nn

from .methods.base import ModelMethod, StageContext, StageResult
from .registry import get_method
from .targets import replace_module, select_modules
from .utils import peak_rss_bytes, progress_iter


def apply_stage(model: nn.Module, config, ctx: StageContext, where: str = "stage") -> StageResult:
    method = get_method(config.method)
    start = time.perf_counter()
    if isinstance(method, ModelMethod):
        result = method.run(model, config, ctx)
    else:
        modules = select_modules(model, config.targets, config.ignore, f"{where}.targets")
        decisions, result = method.plan(modules, config, ctx)
        chosen = [(name, module) for name, module in modules.items() if decisions.get(name) is not None]
        for name, module in progress_iter(chosen, f"{config.method}: apply", ctx.progress):
            replace_module(model, name, method.apply(name, module, config, decisions[name], None))
    result.summary.setdefault("wall_time_s", time.perf_counter() - start)
    result.summary["peak_rss_bytes"] = peak_rss_bytes()
    return result


def compress_model(model: nn.Module, recipe, ctx: StageContext) -> list[StageResult]:
    """Run every stage in order; the model is modified in place."""
    return [apply_stage(model, stage, ctx, f"stages[{i}]") for i, stage in enumerate(recipe.stages)]
