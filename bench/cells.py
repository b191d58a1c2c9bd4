"""The resumable driver the benchmarks share: each cell runs in its own subprocess, one at a time.

A cell's process prints its result as the last line of stdout (JSON). Running cells in separate
processes keeps their wall time and peak RSS their own; saving the JSON (and re-rendering the
markdown) after every cell means a stopped run resumes where it stopped. A failing cell is
reported and skipped, never fatal to the cells after it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def forwarded_flags(args, names: Iterable[str]) -> list[str]:
    """``--name value`` for each argparse attribute in ``names`` (underscores become dashes)."""
    flags = []
    for name in names:
        flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


def load_cells(store: Path) -> dict:
    return json.loads(store.read_text()) if store.is_file() else {}


def save_cells(cells: dict, store: Path, markdown: Path, render: Callable[[dict], str]) -> None:
    """Write ``cells`` merged over what the store holds now (another driver may have added cells to
    it since this one loaded it; this driver's cells win), then the markdown of the merged set."""
    store.parent.mkdir(parents=True, exist_ok=True)
    for key, cell in load_cells(store).items():
        cells.setdefault(key, cell)
    tmp = store.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cells, indent=2))
    tmp.replace(store)  # atomic: a concurrent reader never sees half a file
    markdown.write_text(render(cells))


def run_cells(
    plan: Iterable[str],
    cells: dict,
    command: Callable[[str], list[str]],
    save: Callable[[dict], None],
    describe: Callable[[dict], str],
    done: Callable[[str], bool] | None = None,
) -> dict:
    """Run every key of ``plan`` not ``done`` (default: already in ``cells``) as ``command(key)``.

    Each result gets ``cell_wall_s`` (the subprocess's wall time, start-up included), is stored
    under its key and saved at once; ``describe(cell)`` is the progress line's text.
    """
    done = done or (lambda key: key in cells)
    for key in plan:
        if done(key):
            continue
        start = time.perf_counter()
        out = subprocess.run(command(key), capture_output=True, text=True)
        if out.returncode:
            print(f"{key} failed:\n{out.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        cells[key] = cell = json.loads(out.stdout.strip().splitlines()[-1])
        cell["cell_wall_s"] = time.perf_counter() - start
        save(cells)
        print(f"{key}: {describe(cell)} ({cell['cell_wall_s']:.0f} s)", file=sys.stderr, flush=True)
    return cells
