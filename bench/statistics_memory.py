"""Memory and time of accumulating one input's statistics -> bench/results/statistics_memory.md (+ .json).

The calibration sums each batch's input products x^T x into a float64 total. `float64` converts the batch and
multiplies in place (addmm_); `float32 whole` (the code before 2026-12-05) computed the batch's product in
float32 and added it to the total, which allocates the product and its float64 cast: 12 bytes per element of
the total; `float32 blocks` (compress.activations._accumulate now, for the dense-current cross products) does
the same a block of rows at a time. `panels` (compress.activations._accumulate_gram, what the covariances use
now) computes x^T x on and above its diagonal only, a panel of rows at a time, then fills the lower triangle
once at the end (its time is in the column: spread over 3 batches here, over every batch of a layer in a run).
Each cell runs in a fresh process (its peak RSS growth over the inputs is its own): 3 batches of 2,048 tokens
(calibration_batch_size 4 x 512) at the input widths of SmolLM2-135M (576, 1,536), Gemma-3-270M (2,048), the
synthetic 3B (3,200, 8,640) and Llama-2-7B (11,008).

    python bench/statistics_memory.py [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WIDTHS = (576, 1536, 2048, 3200, 8640, 11008)
VARIANTS = ("float64", "float32 whole", "float32 blocks", "float64 panels", "float32 panels")
TOKENS, BATCHES = 2048, 3


def cell(width: int, variant: str) -> dict:
    import torch

    from compress.activations import _accumulate, _accumulate_gram, _fill_lower

    torch.manual_seed(0)
    total = torch.zeros(width, width, dtype=torch.float64)
    total += 0  # touch its pages: the growth below is the accumulation's alone
    batches = [torch.randn(TOKENS, width) for _ in range(BATCHES)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    for x in batches:
        if variant == "float64":
            x64 = x.to(torch.float64)
            total.addmm_(x64.T, x64)
            del x64
        elif variant == "float32 whole":
            total += x.T @ x
        elif variant == "float32 blocks":
            _accumulate(total, x, x)
        else:
            _accumulate_gram(total, x.to(torch.float64) if variant == "float64 panels" else x)
    if variant.endswith("panels"):
        _fill_lower(total)
    seconds = (time.perf_counter() - start) / BATCHES
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"width": width, "variant": variant, "peak_growth_bytes": growth, "seconds_per_batch": seconds}


def render(rows: list[dict], note: str = "") -> str:
    by = {(r["width"], r["variant"]): r for r in rows}
    lines = [
        "# Accumulating input statistics: memory and time per batch",
        "",
        f"Written by `python bench/statistics_memory.py` ({rows[0]['date']}, one thread): {BATCHES} batches of "
        f"{TOKENS:,} tokens added to a float64 width x width total, each cell in a fresh process. Peak growth = "
        "the process's peak RSS over what it held before the first batch (total and inputs included there). "
        "`float32 whole` is the code before 2026-12-05: the product and its float64 cast were whole temporaries "
        "(12 bytes per element of the total); `float32 blocks` is `compress.activations._accumulate`, 2^22 "
        "elements of the product at a time (one block up to width 2,048: the same arithmetic as whole there); "
        "`panels` is `compress.activations._accumulate_gram` (what the covariances use since 2026-12-05: x^T x on "
        "and above the diagonal, in panels of an eighth of the rows, within the same 2^22-element bound in "
        "float32; the lower triangle filled once at the end, its time included).",
        "",
        "| width | total MiB | "
        + " | ".join(f"{v}: peak growth MiB" for v in VARIANTS)
        + " | "
        + " | ".join(f"{v}: s / batch" for v in VARIANTS)
        + " |",
        "|---|---|" + "---|" * (2 * len(VARIANTS)),
    ]
    for width in WIDTHS:
        cells = [by[(width, v)] for v in VARIANTS]
        lines.append(
            f"| {width:,} | {width * width * 8 / 2**20:,.0f} | "
            + " | ".join(f"{c['peak_growth_bytes'] / 2**20:,.0f}" for c in cells)
            + " | "
            + " | ".join(f"{c['seconds_per_batch']:.3f}" for c in cells)
            + " |"
        )
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 3 and not sys.argv[1].startswith("-"):  # one cell, in this fresh process
        print(json.dumps(cell(int(sys.argv[1]), sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--note", default="", help="how the machine was shared, etc.: printed under the table")
    parser.add_argument("--render", action="store_true", help="rewrite the table from the stored results")
    args = parser.parse_args()
    store = RESULTS / "statistics_memory.json"
    if args.render:
        stored = json.loads(store.read_text())
        note = args.note or stored.get("note", "")
        store.write_text(json.dumps({"note": note, "rows": stored["rows"]}, indent=2))
        (RESULTS / "statistics_memory.md").write_text(render(stored["rows"], note))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rows = []
    for width in WIDTHS:
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, __file__, str(width), variant], capture_output=True, text=True, env=env, check=True
            )
            row = {**json.loads(out.stdout.strip().splitlines()[-1]), "date": date.today().isoformat()}
            print(row, flush=True)
            rows.append(row)
    store.write_text(json.dumps({"note": args.note, "rows": rows}, indent=2))
    (RESULTS / "statistics_memory.md").write_text(render(rows, args.note))


if __name__ == "__main__":
    main()
