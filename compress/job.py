"""`compress run`: load -> compress -> save the checkpoint -> evaluate compressed and dense -> report (-> push).

The run folder is written into a temporary sibling. Until the compressed checkpoint is saved, a failure
(or Ctrl-C) removes it, so bad input never leaves a half-written output. From then on the work is worth
keeping: a step that fails (an evaluation, the report, the push) leaves the folder in place with the
checkpoint and everything measured before it, records the error in report.json (traceback in error.log)
and raises ``RunIncomplete``.

The compressed model is evaluated first; the dense baseline is then measured on the source reloaded
(same settings, same run), so the two models are never in memory together.
"""

from __future__ import annotations

import datetime
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from . import distributed
from .errors import CompressError, RunIncomplete, describe_exception, write_traceback
from .utils import (
    StagedFolder,
    folder_bytes,
    large_allocations_mapped,
    map_large_allocations_when_tight,
    peak_gpu_bytes,
    peak_rss_bytes,
    require,
    return_freed_memory,
)

ERROR_LOG = "error.log"


def _map_allocations_if_tight(model) -> None:
    """Large allocations on their own mappings for the rest of the run when the model's float32 weights make
    memory tight (:func:`compress.utils.map_large_allocations_when_tight`)."""
    map_large_allocations_when_tight(4 * count_params(model))


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def versions() -> dict:
    import importlib.metadata as md

    from . import __version__

    out = {"compress": __version__}  # the distribution is compress-llm; the import name is what users know
    for package in ("torch", "transformers", "lm_eval", "accelerate"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = None
    return out


def _write_report_json(folder: Path, report: dict) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))


def _finish_steps(folder: Path, out: Path, report: dict, steps: list[tuple[str, Callable[[], None]]]) -> None:
    """Run the steps after the checkpoint; on failure keep the folder, record the error, raise RunIncomplete."""
    for name, step in steps:
        try:
            step()
        except (Exception, KeyboardInterrupt) as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            log = None if interrupted or isinstance(exc, CompressError) else write_traceback(exc, folder / ERROR_LOG)
            cause = "interrupted" if interrupted else describe_exception(exc)
            report["error"] = {"step": name, "message": cause, "log": ERROR_LOG if log else None}
            _write_report_json(folder, report)
            where = f" (traceback in {out / ERROR_LOG})" if log else ""
            raise RunIncomplete(
                name,
                f"{name} failed: {cause}{where}; the checkpoint and everything measured "
                f"before this step are kept in {out} (report.json records the error)",
                interrupted=interrupted,
            ) from exc


def _follow(recipe, model_id: str, device: str, out: Path, streamed: bool, resume: bool) -> None:
    """A non-main process of a multi-process run: the same compression and evaluations in lockstep with the
    main process (every statistic and perplexity sum is all-reduced), nothing written, no lm-eval tasks.
    Streamed, it walks the layers on its share of the windows and, once the main process has written the
    checkpoint, scores that checkpoint as the main process does."""
    from .api import compress
    from .models import load_model
    from .scoring import evaluate

    dense_eval = recipe.eval.model_copy(update={"budgets": None})
    if not streamed:
        loaded = load_model(model_id)
        _map_allocations_if_tight(loaded.model)
        model = compress(
            loaded.model.to(device), recipe, tokenizer=loaded.tokenizer, progress=False, source=loaded.source
        )
        del loaded
        evaluate(model, model.compression.tokenizer, recipe.eval, progress=False)
        if recipe.eval.compare_dense:
            model = None
            dense = load_model(model_id)
            evaluate(dense.model.to(device), dense.tokenizer, dense_eval, False)
        return

    from .streaming import StreamedLayers

    loaded = open_streamed(model_id, device)
    _map_allocations_if_tight(loaded.model)
    state = StagedFolder.partial_path(out) / ".resume" / "state.pt"
    store = StreamedLayers(loaded.stream, None, state=state, key=resume_key(recipe, loaded.folder), resume=resume)
    model = compress(
        loaded.model, recipe, tokenizer=loaded.tokenizer, progress=False, source=loaded.source, layer_store=store
    )
    tokenizer, source_folder = model.compression.tokenizer, loaded.folder
    del loaded, model, store
    distributed.barrier()  # the main process has written the checkpoint
    evaluate(StagedFolder.partial_path(out) / "model", tokenizer, recipe.eval, progress=False)
    if recipe.eval.compare_dense:
        evaluate(source_folder, tokenizer, dense_eval, False)


def streamable(recipe) -> bool:
    """Whether `compress run` streams the model layer by layer (never whole in memory): one stage whose method
    streams (``Method.streams``), in one process or several; otherwise the model is loaded whole. A .gguf
    source streams from its de-quantised copy in the cache."""
    from .registry import get_method

    if len(recipe.stages) != 1:
        return False
    stage = recipe.stages[0]
    method = get_method(stage.method)
    return method.level == "layers" and method.streams(stage) and not method.needs_teacher(stage)


def resume_key(recipe, folder: Path) -> str:
    """What a saved state must match to be resumed: the recipe, and the source's shards (names, sizes and
    headers: the tensors' names, shapes, dtypes and offsets)."""
    import hashlib
    import struct

    digest = hashlib.sha256(recipe.model_dump_json().encode())
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            digest.update(f"{path.name}:{path.stat().st_size}:".encode() + f.read(length))
    return digest.hexdigest()


def _prepare_resume(out: Path, recipe, source_folder: Path | None, resume: bool, echo) -> Path:
    """The resume state file of a streamed run into ``out`` (``source_folder``; None: not streamed). With
    ``resume``, a state saved for another recipe or source is refused before anything is touched; without it,
    an unfinished run is removed so that the run starts over."""
    partial = StagedFolder.partial_path(out)
    state = partial / ".resume" / "state.pt"
    if source_folder is not None and resume and state.is_file():
        from .streaming import saved_key

        if saved_key(state) != resume_key(recipe, source_folder):
            raise CompressError(
                f"the unfinished run in {partial} was started with another recipe or source; "
                "run without --resume to start over"
            )
    elif resume:
        echo("nothing to resume: " + ("no unfinished run of it" if source_folder else "this run is not streamed"))
    if source_folder is not None and partial.exists() and not resume:
        echo(f"starting over: removing the unfinished run in {partial} (--resume continues it)")
        shutil.rmtree(partial)
    return state


def open_streamed(model_id: str, device: str):
    """The source as a :class:`compress.streaming.StreamedModel` (nothing read yet) in a LoadedModel."""
    import torch
    from transformers import AutoTokenizer

    from .models import LoadedModel, describe_source, model_folder
    from .streaming import StreamedModel

    folder = model_folder(model_id)
    source = describe_source(model_id, folder)
    stream = StreamedModel(folder, dtype=torch.float32, device=device)
    stream.materialise(skip_layers=True)
    return LoadedModel(stream.model, AutoTokenizer.from_pretrained(folder), source, folder, stream)


def run_job(
    recipe_path: str | Path,
    model_id: str,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    device: str = "auto",
    echo=print,
    stream: bool = True,
    resume: bool = False,
) -> Path:

    import torch

    from .api import compress, output_dtype, save, save_streamed
    from .calibration import check_calibration
    from .models import checkpoint_bytes, load_model
    from .recipe import load_recipe, recipe_to_yaml
    from .report import write_report
    from .scoring import check_eval, evaluate
    from .training import check_batches_split

    recipe = load_recipe(recipe_path)  # validated before anything heavy happens
    require("matplotlib", "eval", "the report's plots")
    check_eval(recipe.eval)  # task names and their datasets, before the model loads
    check_calibration(recipe.calibration)
    check_batches_split(recipe)
    out = Path(out)
    if out.exists() and not overwrite:
        raise CompressError(f"output {out} already exists; pass --overwrite to replace it")
    push = recipe.output.push_to_hub
    if push is not None:  # fail before the heavy work, not after it
        from .hub import resolve_token

        try:
            resolve_token()
        except CompressError as exc:
            raise CompressError(f"output.push_to_hub is set but {exc}; the run was not started") from None
    if device == "auto":
        device = str(distributed.device())
    streamed = stream and streamable(recipe)
    if not distributed.is_main():  # the other processes of a launch: compute their share, write nothing
        return _follow(recipe, model_id, device, out, streamed, resume)

    echo(f"{'opening' if streamed else 'loading'} {model_id} ...")
    loaded = open_streamed(model_id, device) if streamed else load_model(model_id)
    model, tokenizer = (loaded.model if streamed else loaded.model.to(device)), loaded.tokenizer
    _map_allocations_if_tight(model)
    state = _prepare_resume(out, recipe, loaded.folder if streamed else None, resume, echo)
    with StagedFolder(out, overwrite=overwrite, partial=streamed) as staged:
        tmp = staged.path
        params_before = count_params(model)
        bytes_before = checkpoint_bytes(loaded, output_dtype(recipe, loaded.source))  # no copy written

        echo(f"compressing with {len(recipe.stages)} stage(s){', streamed layer by layer' if streamed else ''} ...")
        store = None
        if streamed:
            from .streaming import CheckpointWriter, StreamedLayers

            dtype = getattr(torch, output_dtype(recipe, loaded.source))
            key = resume_key(recipe, loaded.folder)
            writer = CheckpointWriter(tmp / "model", dtype)
            store = StreamedLayers(loaded.stream, writer, state=state, key=key, resume=resume)
            if store.layers_done:
                echo(f"resuming after {store.layers_done} finished layer(s)")
        model = compress(model, recipe, tokenizer=tokenizer, progress=progress, source=loaded.source, layer_store=store)
        info = model.compression
        if streamed:
            save_streamed(model, store, tmp / "model")
            distributed.barrier()  # the other processes score the written checkpoint with this one
        else:
            save(model, tmp / "model")
        (tmp / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        staged.keep()  # the checkpoint is saved: from here on a failure keeps the folder

        results = info.stages
        targeted_before = sum(r.summary.get("targeted_params_before", 0) for r in results)
        targeted_after = sum(r.summary.get("targeted_params_after", 0) for r in results)
        targeted_stored = sum(
            r.summary.get("targeted_params_stored", r.summary.get("targeted_params_after", 0)) for r in results
        )
        report = {
            "recipe": recipe.model_dump(mode="json"),
            "source": loaded.source,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "device": device,
            "processes": distributed.world_size(),
            "path": "streamed" if streamed else "in memory",
            "size": {
                "params_before": params_before,
                "params_after": count_params(model),
                "targeted_params_before": targeted_before,
                "targeted_params_after": targeted_after,
                "targeted_params_stored": targeted_stored,
                "compression_ratio": 1 - targeted_after / targeted_before if targeted_before else 0.0,
                "bytes_before": bytes_before,
                "bytes_after": safetensors_bytes(tmp / "model"),
                "folder_bytes_after": folder_bytes(tmp / "model"),
                "dtype": info.dtype,
            },
            "timing": {
                "compression_wall_time_s": info.wall_time_s,
                "peak_rss_bytes": peak_rss_bytes(),
                "peak_gpu_bytes": peak_gpu_bytes(),
                "large_allocations_mapped": large_allocations_mapped(),
            },
            "calibration": None
            if info.calibration is None
            else {
                "samples": recipe.calibration.samples,
                "seq_len": recipe.calibration.seq_len,
                "sources": info.calibration,
            },
            "eval_dense": None,
            "eval_compressed": None,
            "stages": [{"method": r.method, "summary": r.summary, "rows": r.rows} for r in results],
        }
        _write_report_json(tmp, report)
        source_folder = loaded.folder
        del loaded  # the compressed model is `model` now (compressed in place)
        if streamed:
            model = None  # scored from its shards
        return_freed_memory()  # the evaluation's peak should not sit on the compression's freed pages

        def evaluate_compressed():
            echo("evaluating the compressed model ...")
            # streamed: scored from its shards (perplexity layer by layer, lm-eval tasks offloaded)
            target = tmp / "model" if model is None else model
            report["eval_compressed"] = evaluate(target, info.tokenizer, recipe.eval, progress)
            _write_report_json(tmp, report)

        def evaluate_dense():
            nonlocal model
            if not recipe.eval.compare_dense:
                return
            model = None  # the compressed model is saved and scored: free it before the dense one loads
            return_freed_memory()
            echo("evaluating the dense model (reloaded from the source) ...")
            dense_eval = recipe.eval.model_copy(update={"budgets": None})  # budgets are the compressed model's
            if streamed:
                report["eval_dense"] = evaluate(source_folder, tokenizer, dense_eval, progress)
            else:
                dense = load_model(model_id)
                report["eval_dense"] = evaluate(dense.model.to(device), dense.tokenizer, dense_eval, progress)
            _write_report_json(tmp, report)

        def write_the_report():
            report["timing"]["peak_rss_bytes"] = peak_rss_bytes()
            report["timing"]["peak_gpu_bytes"] = peak_gpu_bytes()
            write_report(report, [r.series for r in results], tmp)

        _finish_steps(
            tmp,
            out,
            report,
            [
                ("evaluating the compressed model", evaluate_compressed),
                ("evaluating the dense model", evaluate_dense),
                ("writing the report", write_the_report),
            ],
        )
    echo(f"wrote {out}")
    if push is not None:  # the run folder is complete and in place: a failed push leaves it intact
        from .hub import push_run

        try:
            push_run(out, push.repo_id, private=push.private, revision=push.revision, echo=echo)
        except CompressError as exc:
            flags = ("" if push.private else " --public") + (f" --revision {push.revision}" if push.revision else "")
            raise RunIncomplete(
                "pushing to the hub",
                f"{exc} (the run itself succeeded and is intact in {out}; "
                f"retry with `compress push {out} {push.repo_id}{flags}`)",
            ) from None
    return out
