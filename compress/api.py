"""The Python API: compress a model, save it, score it. The CLI is a thin layer over these three.

    import compress
    model = compress.compress("smollm2-135m", "recipes/lowrank-20.yaml")
    compress.save(model, "out/")
    scores = compress.evaluate(model, tasks=["wikipedia_ppl"])

Heavy imports happen inside the functions, so ``import compress`` stays light.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CompressError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .methods.base import StageResult


@dataclass
class Compression:
    """What :func:`compress` did, kept on the model as ``model.compression``: the recipe, each stage's report,
    the tokenizer that goes with the compressed model (a stage may have replaced it) and the model's source."""

    recipe: Any
    stages: list[StageResult]
    tokenizer: Any
    source: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    calibration: list[dict] | None = None  # the calibration sources and their windows (None: data-free run)
    dtype: str = "float32"  # what the weights are stored in


def as_recipe(recipe) -> Any:
    """A validated Recipe from a YAML path, a Recipe, a dict, one stage config or a list of stage configs."""
    from pydantic import BaseModel

    from .methods.base import StageConfig
    from .recipe import load_recipe, parse_recipe, recipe_model

    if isinstance(recipe, recipe_model()):
        return recipe
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    if isinstance(recipe, dict):
        return parse_recipe(recipe, "recipe")
    if isinstance(recipe, StageConfig):
        recipe = [recipe]
    if isinstance(recipe, (list, tuple)) and recipe:
        stages = [s.model_dump(mode="json") if isinstance(s, BaseModel) else s for s in recipe]
        return parse_recipe({"name": "python", "stages": stages}, "recipe")
    raise CompressError(f"recipe must be a YAML path, a Recipe, a dict or stage configs; got {type(recipe).__name__}")


def output_dtype(recipe, source: dict) -> str:
    """The dtype the compressed weights are stored in: the recipe's, or with ``auto`` the source's."""
    return recipe.output.dtype if recipe.output.dtype != "auto" else source.get("dtype", "float32")


def compress(
    model: str | Path | nn.Module,
    recipe,
    *,
    tokenizer=None,
    calibration: torch.Tensor | None = None,
    device: str | None = None,
    progress: bool = True,
    source: dict | None = None,
    layer_store=None,
) -> nn.Module:
    """Apply ``recipe``'s stages to ``model`` and return the compressed model.

    ``model``: a MODEL_ID (bundled alias, local folder, .gguf file or hub id; loaded here) or an
    ``nn.Module`` (compressed in place; give its ``tokenizer`` if a stage calibrates). ``recipe``: see
    :func:`as_recipe`. ``calibration``: token windows ``[N, seq_len]`` to calibrate on instead of the
    recipe's ``calibration`` data. The work runs in float32; the result is marked as a compress checkpoint,
    stored in the recipe's ``output.dtype`` (``auto``: the source's own dtype), and carries
    :class:`Compression` as ``model.compression``. ``source`` describes where an ``nn.Module`` came from
    (as ``compress.models.load_model`` does; its ``dtype`` is what ``auto`` keeps). ``layer_store``: the model
    is streamed (:class:`compress.streaming.StreamedLayers`): its layers are read, compressed and written one
    at a time, and the model returned holds no layer weights (see :func:`save_streamed`).
    """
    import torch

    from .calibration import build_calibration, check_calibration
    from .checkpoint import mark_compressed
    from .methods.base import StageContext
    from .pipeline import compress_model
    from .training import check_batches_split
    from .utils import bound_kernel_caches

    bound_kernel_caches()  # before the first bf16 matmul (calibration.compute_dtype), or it comes too late
    recipe = as_recipe(recipe)
    source = dict(source or {})
    if isinstance(model, torch.nn.Module):
        source.setdefault("dtype", str(next(model.parameters()).dtype).removeprefix("torch."))
    check_batches_split(recipe)
    if calibration is None:
        check_calibration(recipe.calibration)  # a missing dataset fails before the model loads
    if isinstance(model, (str, Path)):
        from .models import load_model

        loaded = load_model(str(model))
        model, source = loaded.model, loaded.source
        tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer
    if device is not None and layer_store is None:
        model.to(device)
    model.float()  # statistics, factorisations and training in float32 (float64 inside the maths)

    cache: dict = {}

    def windows():  # tokenised with the current tokenizer: a stage (extend_vocab) may replace it
        if calibration is not None:
            return calibration
        if ctx.tokenizer is None:
            raise CompressError("this recipe calibrates on text: pass tokenizer= (or calibration= token windows)")
        if cache.get("tokenizer") is not ctx.tokenizer:
            cache.update(tokenizer=ctx.tokenizer, built=build_calibration(ctx.tokenizer, recipe.calibration))
        return cache["built"].windows

    dtype = output_dtype(recipe, source)
    activations = recipe.calibration.activation_dtype
    if activations == "auto":
        on_gpu = next((p.device.type == "cuda" for p in model.parameters() if p.device.type != "meta"), False)
        activations = "bfloat16" if on_gpu else "float32"
    ctx = StageContext(
        tokenizer=tokenizer,
        calibration_windows=windows,
        progress=progress,
        storage_dtype=getattr(torch, dtype),
        layer_store=layer_store,
        activation_dtype=getattr(torch, activations),
        statistics_dtype=getattr(torch, recipe.calibration.statistics_dtype),
        compute_dtype=getattr(torch, recipe.calibration.compute_dtype),
        activation_storage=recipe.calibration.activation_storage,
    )
    start = time.perf_counter()
    results = compress_model(model, recipe, ctx)
    wall = time.perf_counter() - start
    model.to(getattr(torch, dtype))
    mark_compressed(model, recipe.model_dump(mode="json"))
    used = (
        [{"source": "token windows given to compress()", "windows": len(calibration)}]
        if calibration is not None
        else cache["built"].sources
        if "built" in cache
        else None
    )
    model.compression = Compression(recipe, results, ctx.tokenizer, source, wall, used, dtype)
    return model


def save(
    model: nn.Module, folder: str | Path, *, tokenizer=None, overwrite: bool = False, provenance: dict | None = None
) -> Path:
    """Write ``model`` as a compress checkpoint (safetensors, config.json with the compression section,
    tokenizer, a manifest of sha256s) that loads back with ``from_pretrained`` after ``import compress``.

    The compression section is refreshed from the model as it is now, so saving can never forget it.
    The folder appears complete or not at all. ``provenance`` (base model, license ...) goes into the
    manifest; by default what :func:`compress` recorded.
    """
    from .checkpoint import mark_compressed
    from .models import save_folder
    from .utils import atomic_folder

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise CompressError(f"{folder} already exists; pass overwrite=True to replace it")
    info = getattr(model, "compression", None)
    previous = getattr(model.config, "quantization_config", None)
    recipe = info.recipe.model_dump(mode="json") if info is not None else getattr(previous, "recipe", None)
    mark_compressed(model, recipe)
    tokenizer = tokenizer if tokenizer is not None else getattr(info, "tokenizer", None)
    extra = {**info.source, "recipe": info.recipe.name} if info is not None else None
    if provenance is not None:
        extra = {**(extra or {}), **provenance}
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        save_folder(model, tokenizer, tmp, extra=extra)
    return folder


def save_streamed(model: nn.Module, layer_store, folder: str | Path, provenance: dict | None = None) -> Path:
    """Finish the checkpoint a streamed :func:`compress` wrote layer by layer into ``folder``: the parts
    outside the layers, the index, config.json with the compression section, tokenizer and manifest."""
    from .checkpoint import mark_compressed
    from .models import write_manifest

    folder, info = Path(folder), model.compression
    layer_store.finish()
    mark_compressed(model, info.recipe.model_dump(mode="json"))
    model.config.dtype = info.dtype
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    info.tokenizer.save_pretrained(folder)
    write_manifest(folder, {**info.source, "recipe": info.recipe.name, **(provenance or {})})
    return folder


def evaluate(
    model: nn.Module,
    tasks: list[str] | tuple[str, ...] = ("wikipedia_ppl",),
    *,
    tokenizer=None,
    perplexity_windows: int | None = 32,
    seq_len: int = 512,
    limit: int | dict[str, int] | None = None,
    progress: bool = True,
) -> dict:
    """Held-out token perplexity plus lm-eval ``tasks`` of an in-memory model (the numbers `compress run`
    reports). ``tokenizer`` defaults to the one :func:`compress` kept on the model."""
    from pydantic import ValidationError

    from .recipe import EvalConfig
    from .scoring import check_eval
    from .scoring import evaluate as score

    tokenizer = tokenizer if tokenizer is not None else getattr(getattr(model, "compression", None), "tokenizer", None)
    if tokenizer is None:
        raise CompressError("evaluate needs the model's tokenizer: pass tokenizer=")
    try:
        config = EvalConfig(tasks=list(tasks), perplexity_windows=perplexity_windows, seq_len=seq_len, limit=limit)
    except ValidationError as exc:
        raise CompressError(f"evaluate: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    check_eval(config)
    return score(model, tokenizer, config, progress)
