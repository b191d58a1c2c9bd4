"""Apply a recipe's stages to a model, one stage after another, through the method protocol.

The pipeline owns the order of work, the model and the measurements; methods only answer the hooks of
:class:`compress.methods.base.Method`:

* layer methods: select the targets -> ``plan`` (with a :class:`ModelPlanner` for any pre-pass) ->
  for each decoder layer in order: measure what ``calibration`` declares (the engine in
  :mod:`compress.activations`; nothing at all for data-free methods) -> ``apply`` per module ->
  optional layer-local training -> next layer; then ``summarise`` and optional global training;
* model-level methods: read the parts -> measure what ``model_needs`` declares -> ``apply_model`` ->
  install the returned parts;
* training methods: select the targets -> global training.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from .methods.base import Method, ModelStats, Planner, StageContext, StageResult
from .registry import get_method
from .targets import layer_index, replace_module, select_modules
from .utils import map_large_allocations, peak_gpu_bytes, peak_rss_bytes, progress_iter, trim_heap


class ModelPlanner(Planner):
    """The pipeline's side of :class:`Planner`: measurements on the model a plan may ask for."""

    def __init__(self, model: nn.Module, ctx: StageContext):
        self._model, self._ctx = model, ctx

    @property
    def model_config(self):
        return self._model.config

    def windows(self, limit: int | None = None) -> torch.Tensor:
        from .errors import CompressError

        windows = self._ctx.calibration_windows()
        if windows is None:
            raise CompressError("this stage needs calibration windows")
        return windows if limit is None else windows[:limit]

    def stored_value_bytes(self, module: nn.Module) -> int:
        dtype = self._ctx.storage_dtype or module.weight.dtype
        return torch.empty(0, dtype=dtype).element_size()

    def progress(self, items, description: str):
        items = list(items)
        return progress_iter(items, description, self._ctx.progress, total=len(items))

    def map_sensitivity_statistics(self, modules, fn, windows, batch_size, output_side=False):
        from .activations import ResidentLayers, sensitivity_walk

        store = ResidentLayers() if self._ctx.layer_store is None else self._ctx.layer_store.reading()
        values = {}

        device = _walk_device(self._model, self._ctx)

        def on_layer(index, layer_modules, stats, fisher):
            with _full_precision(device):
                for name, module in layer_modules.items():
                    values[name] = fn(name, module, stats[name], fisher[name])

        with _computing(self._ctx, device):
            sensitivity_walk(
                self._model,
                modules,
                windows,
                store,
                on_layer,
                batch_size=batch_size,
                statistics=True,
                statistics_dtype=self._ctx.statistics_dtype,
                progress=self._ctx.progress,
                output_side=output_side,
            )
        # in the modules' order, not the walk's (top layer first): the rank allocation breaks ties by order, and
        # an elastic resize allocates over the model's modules in model order
        return {name: values[name] for name in modules}


def _engine_options(calibration) -> dict:
    return {
        "statistics": {"none": "none", "io": "io"}.get(calibration.statistics, "cov"),
        "sequential": calibration.sequential,
        "sublayer": calibration.sublayer,
        "cross": calibration.statistics == "dense_cross" and calibration.sequential,
        "batch_size": calibration.batch_size,
        "output_side": calibration.output_side,
    }


def _walk_device(model: nn.Module, ctx: StageContext) -> torch.device:
    """The device the layer walk computes on."""
    store = ctx.layer_store  # a streamed model's parameters are on the meta device until read
    return store.stream.device if store is not None else next(model.parameters()).device


def _computing(ctx: StageContext, device: torch.device):
    """The calibration passes' matrix products in the recipe's compute dtype (autocast; off for float32).
    Without autocast's cache of cast weights: it would keep a copy of every layer's weights, read one at a time
    (the whole model again in bf16, and more for the layers' dense copies)."""
    enabled = ctx.compute_dtype != torch.float32
    return torch.autocast(device.type, dtype=ctx.compute_dtype, enabled=enabled, cache_enabled=False)


def _full_precision(device: torch.device):
    """Autocast off inside a pass: factorisations, curves and layer training keep their own dtypes."""
    return torch.autocast(device.type, enabled=False)


def _activations(model: nn.Module, windows: torch.Tensor, ctx: StageContext, batch_size: int):
    """Where the layer walk holds its hidden states: the recipe's place, or (auto) the one they fit in."""
    from .distributed import world_size
    from .offload import Activations, choose_place

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    dtype = ctx.activation_dtype or torch.float32
    share = -(-windows.numel() // world_size())  # this process's tokens
    stream_bytes = share * config.hidden_size * torch.empty(0, dtype=dtype).element_size()
    device = _walk_device(model, ctx)
    place = choose_place(ctx.activation_storage, stream_bytes, device)
    if place == "disk":  # memory is what the walk saves: freed blocks leave the process at once (not a batch's)
        map_large_allocations(_above_batch_activations(config, batch_size * windows.shape[1]))
    return Activations(place, device)


def _above_batch_activations(config, batch_tokens: int) -> int:
    """A mapping threshold above a batch's widest activation (its tokens x the wider of the hidden and MLP widths,
    in float32 as the statistics' products): the walk allocates and frees those batch after batch, and the heap
    reuses them without fresh page faults, where their own mappings would be faulted in afresh every time. Larger
    blocks (a layer's weights and statistics at scale) still leave at once. lowrank-20 on SmolLM2 (batches of 4
    windows), hidden states on disk, eval off, alone on a core: passes and statistics 76 s at 16 MiB against 91 s
    at 4, the compression's peak 0.82 GB either way."""
    widest = max(config.hidden_size, getattr(config, "intermediate_size", None) or 0)
    return 1 << (batch_tokens * widest * 4).bit_length()  # the next power of two above it


def _running_as(model: nn.Module, selection: dict, made: list[str]):
    """A context manager factory: while open, the modules replaced so far (``made``, which grows) serve the
    ranks of ``selection`` (an elastic model at another budget); their own selections come back after."""
    import contextlib

    @contextlib.contextmanager
    def switched():
        modules = [(model.get_submodule(name), selection[name]) for name in made if name in selection]
        before = [module.selection for module, _ in modules]
        for module, rank in modules:
            module.select(rank)
        try:
            yield
        finally:
            for (module, _), rank in zip(modules, before):
                module.select(rank)

    return switched


def _apply_layers(model: nn.Module, method: Method, config, ctx: StageContext, where: str) -> StageResult:
    modules = select_modules(model, config.targets, config.ignore, f"{where}.targets")
    planner = ModelPlanner(model, ctx)
    if ctx.activation_storage == "disk":  # memory is what the run saves, from its planning pass on
        map_large_allocations()
    start = time.perf_counter()
    plan = method.plan(modules, config, planner)
    result = plan.result
    result.summary["plan_seconds"] = round(time.perf_counter() - start, 3)  # e.g. the sensitivity pass
    chosen = {name: module for name, module in modules.items() if plan.decisions.get(name) is not None}
    rows = {row["module"]: row for row in result.rows}
    made: list[str] = []

    def replace(name, module, stats):
        replacement = method.apply(name, module, config, plan.decisions[name], stats)
        rows[name].update(replacement.info)
        replace_module(model, name, replacement.module)
        if replacement.module is not module:  # the replaced module stays referenced by `chosen`: free its weights
            module.to("meta")
        trim_heap()  # the factorisation's float64 work matrices, freed but still resident
        made.append(name)
        if store is not None:
            store.record(name, replacement.module, replacement.info)

    store = ctx.layer_store
    if store is not None and store.done:  # a resumed run: the finished layers' modules, as they were written
        from accelerate import init_empty_weights

        from .checkpoint import install_replacements

        finished = {name: entry for name, entry in store.done.items() if name in chosen}
        with init_empty_weights():
            install_replacements(model, {name: entry["spec"] for name, entry in finished.items()})
        for name, entry in finished.items():
            rows[name].update(entry["info"])
            made.append(name)

    training = method.training(config)
    layer_training = training if training is not None and training.scope == "layer" else None
    calibration = method.calibration(config)
    if chosen and (calibration.statistics != "none" or layer_training is not None):
        from .activations import calibrate_sequentially, decoder_layers

        device = _walk_device(model, ctx)

        def on_layer(index, layer_modules, stats):
            # the engine's stats are handed over: each module's entry is dropped as it is replaced, so an
            # input's statistics (q/k/v share one) are freed after their last reader, not at the layer's end
            with _full_precision(device):
                for name, module in layer_modules.items():
                    replace(name, module, stats.pop(name))

        layer_reports = []
        train_layer = None
        if layer_training is not None:
            from .training import train_layer as train_one_layer

            prefix, _ = decoder_layers(model, chosen)

            def train_layer(index, layer, inputs, targets, kwargs):
                local = [
                    name.removeprefix(f"{prefix}.{index}.") for name in made if name.startswith(f"{prefix}.{index}.")
                ]
                if local:
                    with _full_precision(device):
                        layer_reports.append(
                            train_one_layer(layer, method, config, layer_training, local, inputs, targets, kwargs)
                        )

        windows = planner.windows(calibration.windows)
        with _activations(model, windows, ctx, calibration.batch_size) as held, _computing(ctx, device):
            report = calibrate_sequentially(
                model,
                chosen,
                windows,
                on_layer,
                train_layer=train_layer,
                progress=ctx.progress,
                description=f"{method.name}: layers",
                store=ctx.layer_store,
                stream_dtype=ctx.activation_dtype,
                statistics_dtype=ctx.statistics_dtype,
                variants=[_running_as(model, selection, made) for selection in plan.stream_selections],
                pool_variants=plan.streams_pooled,
                activations=held,
                **_engine_options(calibration),
            )
        result.summary["calibration"] = {
            "activations": held.place,
            "compute_dtype": str(ctx.compute_dtype).removeprefix("torch."),
            "layers": report.layers_calibrated,
            "tokens": report.tokens,
            "layer_seconds_total": sum(report.layer_seconds),
            "phase_seconds": {phase: round(t, 3) for phase, t in report.phase_seconds.items()},
            "peak_rss_at": {"phase": report.peak_rss_phase, "layer": report.peak_rss_layer},
        }
        if layer_reports:
            result.summary["training"] = _layer_training_summary(layer_training, layer_reports)
            result.series["layer_train_loss"] = [r["losses"] for r in layer_reports]
    elif ctx.layer_store is not None:  # data-free, streamed: each layer read, its modules replaced, written
        from .activations import decoder_layers

        _, layers = decoder_layers(model, chosen)
        first = store.layers_done
        for i in progress_iter(range(first, len(layers)), f"{method.name}: layers", ctx.progress, len(layers) - first):
            store.enter(i)
            for name, module in chosen.items():
                if layer_index(name) == i:
                    replace(name, module, None)
            store.leave(i)
    else:
        for name, module in progress_iter(list(chosen.items()), f"{method.name}: apply", ctx.progress):
            replace(name, module, None)
    method.summarise(result, config)
    if training is not None and training.scope == "global" and made:
        from .training import train_globally

        trained = train_globally(model, method, config, training, made, planner.windows(), ctx.teacher, ctx.progress)
        result.summary["training"] = trained["summary"]
        result.series.update(trained["series"])
    return result


def _layer_training_summary(training, reports: list[dict]) -> dict:
    return {
        "scope": "layer",
        "layers": len(reports),
        "steps_per_layer": training.steps,
        "tokens_per_layer": reports[0]["tokens"],
        "lr": training.lr,
        "schedule": training.schedule,
        "wall_time_s": sum(r["wall_time_s"] for r in reports),
        "trainable_params_per_layer_max": max(r["trainable_params"] for r in reports),
        "mean_rel_error_before": sum(r["rel_error_before"] for r in reports) / len(reports),
        "mean_rel_error_after": sum(r["rel_error_after"] for r in reports) / len(reports),
    }


def _apply_model_level(model: nn.Module, method: Method, config, ctx: StageContext, where: str) -> StageResult:
    from .activations import head_input_covariance, token_counts
    from .model_parts import install, read_parts

    parts = read_parts(model, config, ctx.tokenizer, where)
    needs = method.model_needs(config)
    stats = ModelStats()
    if needs.token_counts or needs.head_input_cov_windows:
        windows = ModelPlanner(model, ctx).windows()
        if needs.token_counts:
            stats.token_counts = token_counts(windows, parts.embedding.weight.shape[0])
        if needs.head_input_cov_windows:
            stats.head_input_cov = head_input_covariance(model, parts.head, windows[: needs.head_input_cov_windows])
    update, result = method.apply_model(parts, config, stats)
    install(model, parts, update)
    if update.tokenizer is not None:
        ctx.tokenizer = update.tokenizer
    return result


def _apply_training(model: nn.Module, method: Method, config, ctx: StageContext, where: str) -> StageResult:
    from .training import train_globally

    names = list(select_modules(model, config.targets, config.ignore, f"{where}.targets"))
    trained = train_globally(
        model,
        method,
        config,
        method.training(config),
        names,
        ModelPlanner(model, ctx).windows(),
        ctx.teacher,
        ctx.progress,
    )
    return StageResult(method.name, summary=trained["summary"], series=trained["series"])


_LEVELS = {"layers": _apply_layers, "model": _apply_model_level, "training": _apply_training}


def apply_stage(model: nn.Module, config, ctx: StageContext, where: str = "stage") -> StageResult:
    method = get_method(config.method)
    start = time.perf_counter()
    result = _LEVELS[method.level](model, method, config, ctx, where)
    result.summary.setdefault("wall_time_s", time.perf_counter() - start)
    result.summary["peak_rss_bytes"] = peak_rss_bytes()
    if (gpu := peak_gpu_bytes()) is not None:
        result.summary["peak_gpu_bytes"] = gpu
    return result


def compress_model(model: nn.Module, recipe, ctx: StageContext) -> list[StageResult]:
    """Run every stage in order; the model is modified in place.

    When a stage trains towards the dense model (``needs_teacher``, e.g. a distillation loss), a frozen
    copy of the model as it is before the first stage is kept in ``ctx.teacher`` for the run (unless the
    caller gave one): one extra copy of the weights in memory.
    """
    own_teacher = ctx.teacher is None and any(get_method(stage.method).needs_teacher(stage) for stage in recipe.stages)
    if own_teacher:
        ctx.teacher = copy.deepcopy(model).eval().requires_grad_(False)
    try:
        return [apply_stage(model, stage, ctx, f"stages[{i}]") for i, stage in enumerate(recipe.stages)]
    finally:
        if own_teacher:
            ctx.teacher = None
