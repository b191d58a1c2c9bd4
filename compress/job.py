"""`compress run`: load -> evaluate dense -> compress -> save -> evaluate compressed -> report.

Everything is written into a temporary sibling of the output folder, renamed into place
only when the whole job succeeded.
"""
from __future__ import annotations

import datetime
import shutil
import time
from pathlib import Path

from .errors import CompressError
from .utils import atomic_folder, folder_bytes, peak_rss_bytes


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for package in ("compress", "torch", "transformers", "lm_eval", "accelerate"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = None
    return out


def run_job(recipe_path: str | Path, model_id: str, out: str | Path, overwrite: bool = False,
            progress: bool = True, device: str = "auto", echo=print) -> Path:
    import torch

    from .calibration import calibration_windows
    from .checkpoint import mark_compressed
    from .evaluate import evaluate
    from .methods.base import StageContext
    from .models import load_model, save_folder
    from .pipeline import compress_model
    from .recipe import load_recipe, recipe_to_yaml
    from .report import write_report

    recipe = load_recipe(recipe_path)  # validated before anything heavy happens
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
        device = "cuda" if torch.cuda.is_available() else "cpu"

    echo(f"loading {model_id} ...")
    loaded = load_model(model_id)
    model, tokenizer = loaded.model.to(device), loaded.tokenizer
    with atomic_folder(out, overwrite=overwrite) as tmp:
        dense_dir = tmp / "_dense"
        save_folder(model, tokenizer, dense_dir)
        bytes_before = safetensors_bytes(dense_dir)
        shutil.rmtree(dense_dir)
        params_before = count_params(model)

        eval_dense = None
        if recipe.eval.compare_dense:
            echo("evaluating the dense model ...")
            eval_dense = evaluate(model, tokenizer, recipe.eval, progress)

        cache: dict = {}

        def windows():  # tokenised with the current tokenizer: a stage (extend_vocab) may replace it
            if cache.get("tokenizer") is not ctx.tokenizer:
                cache.update(tokenizer=ctx.tokenizer, windows=calibration_windows(ctx.tokenizer, recipe.calibration))
            return cache["windows"]

        ctx = StageContext(tokenizer=tokenizer, calibration_windows=windows, progress=progress)
        echo(f"compressing with {len(recipe.stages)} stage(s) ...")
        start = time.perf_counter()
        results = compress_model(model, recipe, ctx)
        compress_time = time.perf_counter() - start
        tokenizer = ctx.tokenizer  # saved and evaluated with the model (extend_vocab changes it)

        model.to(getattr(torch, recipe.output.dtype))
        mark_compressed(model, recipe.model_dump(mode="json"))
        save_folder(model, tokenizer, tmp / "model", extra={**loaded.source, "recipe": recipe.name})
        (tmp / "recipe.yaml").write_text(recipe_to_yaml(recipe))

        echo("evaluating the compressed model ...")
        eval_compressed = evaluate(model, tokenizer, recipe.eval, progress)

        targeted_before = sum(r.summary.get("targeted_params_before", 0) for r in results)
        targeted_after = sum(r.summary.get("targeted_params_after", 0) for r in results)
        report = {
            "recipe": recipe.model_dump(mode="json"),
            "source": loaded.source,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "device": device,
            "size": {
                "params_before": params_before, "params_after": count_params(model),
                "targeted_params_before": targeted_before, "targeted_params_after": targeted_after,
                "compression_ratio": 1 - targeted_after / targeted_before if targeted_before else 0.0,
                "bytes_before": bytes_before, "bytes_after": safetensors_bytes(tmp / "model"),
                "folder_bytes_after": folder_bytes(tmp / "model"),
            },
            "timing": {"compression_wall_time_s": compress_time, "peak_rss_bytes": peak_rss_bytes()},
            "eval_dense": eval_dense,
            "eval_compressed": eval_compressed,
            "stages": [{"method": r.method, "summary": r.summary, "rows": r.rows} for r in results],
        }
        write_report(report, [r.series for r in results], tmp)
    echo(f"wrote {out}")
    if push is not None:  # the run folder is complete and in place: a failed push leaves it intact
        from .hub import push_run

        try:
            push_run(out, push.repo_id, private=push.private, revision=push.revision, echo=echo)
        except CompressError as exc:
            flags = ("" if push.private else " --public") + (f" --revision {push.revision}" if push.revision else "")
            raise CompressError(f"{exc} (the run itself succeeded and is intact in {out}; retry with "
                                f"`compress push {out} {push.repo_id}{flags}`)") from None
    return out
