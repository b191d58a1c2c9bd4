"""Apply a recipe's stages to a model, one stage after another.

Module methods are applied module by module in the model's own order, which is decoder
layer order: layer i is finished before layer i+1 is touched. Methods that calibrate on
activations (``needs_activations``, or ``needs_activations_for(config)`` when it depends on
the config) go through the sequential engine in :mod:`compress.activations`: layer i's
input statistics are measured with the already-compressed layers before it, and the
method's ``apply`` receives them as ``stats``. Other methods keep the fast path
(``stats=None``, no forward pass at all).
"""
from __future__ import annotations

import copy
import time

from torch import nn

from .methods.base import ModelMethod, StageContext, StageResult
from .registry import get_method
from .targets import replace_module, select_modules
from .utils import peak_rss_bytes, progress_iter


def needs_activations(method, config) -> bool:
    decide = getattr(method, "needs_activations_for", None)
    return bool(decide(config)) if decide is not None else bool(getattr(method, "needs_activations", False))


def activation_options(method, config) -> dict:
    """Engine options a method asks for: sequential, cross, dense_cov, batch_size."""
    options = getattr(method, "activation_options", None)
    return dict(options(config)) if options is not None else {}


def apply_stage(model: nn.Module, config, ctx: StageContext, where: str = "stage") -> StageResult:
    method = get_method(config.method)
    start = time.perf_counter()
    if isinstance(method, ModelMethod):
        result = method.run(model, config, ctx)
    else:
        modules = select_modules(model, config.targets, config.ignore, f"{where}.targets")
        ctx.extras["model"] = model  # for plans that measure on the model (e.g. sensitivity allocation)
        try:
            decisions, result = method.plan(modules, config, ctx)
        finally:
            ctx.extras.pop("model", None)
        chosen = {name: module for name, module in modules.items() if decisions.get(name) is not None}
        if chosen and needs_activations(method, config):
            from .activations import calibrate_sequentially

            def on_layer(index, layer_modules, stats):
                for name, module in layer_modules.items():
                    replace_module(model, name, method.apply(name, module, config, decisions[name], stats[name]))

            report = calibrate_sequentially(model, chosen, ctx.calibration_windows(), on_layer,
                                            **activation_options(method, config))
            result.summary["calibration"] = {"layers": report.layers_calibrated, "tokens": report.tokens,
                                             "layer_seconds_total": sum(report.layer_seconds)}
        else:
            for name, module in progress_iter(list(chosen.items()), f"{config.method}: apply", ctx.progress):
                replace_module(model, name, method.apply(name, module, config, decisions[name], None))
    result.summary.setdefault("wall_time_s", time.perf_counter() - start)
    result.summary["peak_rss_bytes"] = peak_rss_bytes()
    return result


def needs_teacher(method, config) -> bool:
    decide = getattr(method, "needs_teacher", None)
    return bool(decide(config)) if decide is not None else False


def compress_model(model: nn.Module, recipe, ctx: StageContext) -> list[StageResult]:
    """Run every stage in order; the model is modified in place.

    When a stage trains towards the dense model (``needs_teacher``, e.g. finetune's distill loss),
    a frozen copy of the model as it is before the first stage is kept in ``ctx.extras["teacher"]``
    for the run (unless the caller put a teacher there): one extra copy of the weights in memory.
    """
    own_teacher = "teacher" not in ctx.extras and any(
        needs_teacher(get_method(stage.method), stage) for stage in recipe.stages)
    if own_teacher:
        ctx.extras["teacher"] = copy.deepcopy(model).eval().requires_grad_(False)
    try:
        return [apply_stage(model, stage, ctx, f"stages[{i}]") for i, stage in enumerate(recipe.stages)]
    finally:
        if own_teacher:
            del ctx.extras["teacher"]
