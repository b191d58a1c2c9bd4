"""What mapping large allocations on their own costs and saves -> bench/results/heap_mapping.md (+ .json).

Where memory is tight `compress` gives every allocation of 4 MiB or more its own memory mapping, so that a freed
block leaves the process at once (compress.utils.map_large_allocations_when_tight); glibc's default instead raises
that threshold to the largest block freed so far, and mid-sized blocks come from the heap and stay resident once
freed, but are reused without fresh page faults. Each row is one `compress run` of a recipe, with glibc's default
or with the mapping, in turns (default, mapped, ...); compression wall time and peak RSS come from report.json.

    python bench/heap_mapping.py [--recipe NAME] [--set PATH=VALUE ...] [--model MODEL] [--rounds N] [--threads T]

A shipped recipe (``--recipe lowrank-20``, changed by ``--set`` as in bench/recipe_runs.py) runs with the scale
benchmark's evaluation (token perplexity on 4 windows): the compression is what is measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_runs import with_overrides  # noqa: E402
from scale import RECIPE  # noqa: E402  the scale benchmark's whitening stage at 20 %: a minute or two on SmolLM2

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
STORE, MARKDOWN = RESULTS / "heap_mapping.json", RESULTS / "heap_mapping.md"

# the CLI with glibc's heap throughout ("default") or large blocks mapped from the start ("mapped"), whatever the
# run's memory (the run is otherwise the user's `compress run`: from 2026-12-06 on, a walk with its hidden states on
# disk maps only blocks above a batch's activations, and the heap's top is kept)
LAUNCH = """
import sys
import compress.pipeline
import compress.utils
if sys.argv[1] == "default":
    compress.utils.map_large_allocations = compress.pipeline.map_large_allocations = lambda *_: None
else:
    compress.utils.map_large_allocations()
from compress.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_once(mode: str, recipe: Path, model: str, threads: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, "-c", LAUNCH, mode, "run", str(recipe), model, "--out", str(out)]
    subprocess.run([*command, "--overwrite", "--quiet"], env=env, check=True, capture_output=True)
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][0]["summary"]
    return {
        "mode": mode,
        "compression_s": stage["wall_time_s"],
        "peak_rss_bytes": stage["peak_rss_bytes"],
        "phase_seconds": stage.get("calibration", {}).get("phase_seconds", {}),
    }


def render(results: list[dict]) -> str:
    lines = [
        "# Large allocations on their own mappings",
        "",
        " ".join(line.strip() for line in __doc__.splitlines()[2:7]),
    ]
    for result in results:
        lines += render_one(result)
    return "\n".join(lines) + "\n"


def render_one(result: dict) -> list[str]:
    lines = [
        "",
        f"## `{result['recipe']}` on {result['model']}",
        "",
        f"{result['threads']} thread(s), {result['date']}." + (f" {result['note']}" if result.get("note") else ""),
        "",
        "| run | allocations | compression s | peak RSS GiB | forward s | statistics s | factorise s |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(result["runs"], 1):
        phases = row["phase_seconds"]
        lines.append(
            f"| {i} | {'glibc default' if row['mode'] == 'default' else 'mapped (4 MiB)'} | "
            f"{row['compression_s']:.1f} | {row['peak_rss_bytes'] / 2**30:.3f} | {phases.get('forward', 0):.1f} | "
            f"{phases.get('statistics', 0):.1f} | {phases.get('factorise', 0):.1f} |"
        )
    mean = {mode: [r for r in result["runs"] if r["mode"] == mode] for mode in ("default", "mapped")}
    seconds = {mode: sum(r["compression_s"] for r in rows) / len(rows) for mode, rows in mean.items()}
    peaks = {mode: max(r["peak_rss_bytes"] for r in rows) / 2**30 for mode, rows in mean.items()}
    lines += [
        "",
        f"Mapped against glibc's default: {seconds['mapped'] / seconds['default']:.3f}x the compression time "
        f"(mean {seconds['mapped']:.1f} s against {seconds['default']:.1f} s), peak RSS {peaks['mapped']:.3f} GiB "
        f"against {peaks['default']:.3f}.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", help="a shipped recipe's name (default: the scale benchmark's whitening at 20 %%)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="change one recipe field")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="", help="the conditions of the runs (e.g. what else the machine ran)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="heap-mapping-") as work:
        work = Path(work)
        body = RECIPE
        if args.recipe is not None:
            body = {**yaml.safe_load((ROOT / "recipes" / f"{args.recipe}.yaml").read_text()), "eval": RECIPE["eval"]}
        recipe = work / f"{args.recipe or 'whiten-20'}.yaml"
        recipe.write_text(yaml.safe_dump(body, sort_keys=False))
        recipe = with_overrides(recipe, args.set, work / "changed")
        runs = []
        for _ in range(args.rounds):
            for mode in ("default", "mapped"):
                runs.append(run_once(mode, recipe, args.model, args.threads, work / mode))
                print(json.dumps(runs[-1]), flush=True)
    result = {
        "recipe": " ".join([args.recipe or "whiten-20", *[f"({item})" for item in args.set]]),
        "model": args.model,
        "threads": args.threads,
        "date": datetime.date.today().isoformat(),
        "note": args.note,
        "runs": runs,
    }
    stored = json.loads(STORE.read_text()) if STORE.is_file() else []
    stored = [stored] if isinstance(stored, dict) else stored
    same = (result["recipe"], result["model"])
    results = [r for r in stored if (r["recipe"], r["model"]) != same] + [result]
    STORE.write_text(json.dumps(results, indent=2))
    MARKDOWN.write_text(render(results))


if __name__ == "__main__":
    main()
