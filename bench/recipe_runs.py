"""Shipped recipes run the way a user runs them -> bench/results/recipe_runs.md (+ recipe_runs.json).

Each recipe goes through `compress run RECIPE MODEL` in its own subprocess (its torch threads fixed by
OMP_NUM_THREADS), and the numbers are read back from the run's report.json: perplexity of the compressed
and the dense model, lm-eval scores, sizes, wall time and peak RSS, plus the sha256 of the checkpoint's
weight files, so two runs of the same recipe (e.g. before and after a refactor, told apart by --tag) can
be compared bit for bit. Runs already in the store are skipped; their folders stay under runs/bench/.

    python bench/recipe_runs.py lowrank-20 attention-50 --tag v1            # hours on CPU
    python bench/recipe_runs.py ofa-gemma --model gemma3-270m --tag v1
    python bench/recipe_runs.py lowrank-40-local --tag lr1e-3 --set stages.0.train.lr=1.0e-3   # a variant

``--set path=value`` changes one field of the recipe (dotted path, list indices as numbers, the value read as
YAML); the changed recipe is written into the run folder and the change is recorded with the run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from cells import load_cells, save_cells

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STORE, MARKDOWN = RESULTS / "recipe_runs.json", RESULTS / "recipe_runs.md"


def key_of(recipe: str, model: str, tag: str) -> str:
    return f"{recipe}@{model}#{tag}"


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def _numbers(summary: dict) -> dict:
    """The scalar entries of a stage summary (and of its training part)."""
    out = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    if isinstance(summary.get("training"), dict):
        out["training"] = _numbers(summary["training"])
    return out


def _by_corpus(evaluation: dict) -> dict:
    return {corpus: ppl["perplexity"] for corpus, ppl in (evaluation.get("perplexity_by_corpus") or {}).items()}


def cell_from_report(report: dict, manifest: dict) -> dict:
    size, timing = report["size"], report["timing"]
    dense, compressed = report.get("eval_dense") or {}, report.get("eval_compressed") or {}
    return {
        "stages": [{"method": stage["method"], **_numbers(stage["summary"])} for stage in report["stages"]],
        "perplexity_by_corpus": _by_corpus(compressed),
        "dense_perplexity_by_corpus": _by_corpus(dense),
        "budgets": compressed.get("budgets"),
        "dtype": size.get("dtype", "float32"),
        "perplexity": (compressed.get("perplexity") or {}).get("perplexity"),
        "dense_perplexity": (dense.get("perplexity") or {}).get("perplexity"),
        "windows": (compressed.get("perplexity") or {}).get("windows"),
        "lm_eval": compressed.get("lm_eval"),
        "dense_lm_eval": dense.get("lm_eval"),
        "compression_ratio": size["compression_ratio"],
        "params_before": size["params_before"],
        "params_after": size["params_after"],
        "bytes_before": size["bytes_before"],
        "bytes_after": size["bytes_after"],
        "compression_wall_s": timing["compression_wall_time_s"],
        "peak_rss_bytes": timing["peak_rss_bytes"],
        "weights_sha256": {name: entry["sha256"] for name, entry in manifest.get("files", {}).items()},
        "error": report.get("error"),
    }


def with_overrides(recipe_path: Path, overrides: list[str], folder: Path) -> Path:
    """The recipe with ``path=value`` changes applied, written next to the run folder (or the file itself)."""
    if not overrides:
        return recipe_path
    import yaml

    data = yaml.safe_load(recipe_path.read_text())
    for item in overrides:
        path, _, value = item.partition("=")
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = data
        for key in parents:
            node = node[key]
        if isinstance(node, list) and last == len(node):  # one past the end: append (e.g. a new stage)
            node.append(yaml.safe_load(value))
        else:
            node[last] = yaml.safe_load(value)
    folder.parent.mkdir(parents=True, exist_ok=True)
    changed = folder.with_name(folder.name + ".recipe.yaml")
    changed.write_text(yaml.safe_dump(data, sort_keys=False))
    return changed


def run_folder(recipe: str, model: str, tag: str) -> str:
    """Where a run writes its folder, relative to the checkout."""
    return "runs/bench/" + re.sub(r"[^\w.-]+", "_", f"{recipe}-{model}-{tag}")


def run_recipe(recipe: str, model: str, tag: str, threads: int, overrides: list[str]) -> dict:
    out = ROOT / run_folder(recipe, model, tag)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    recipe_path = with_overrides(ROOT / "recipes" / f"{recipe}.yaml", overrides, out)
    command = [
        str(Path(sys.executable).parent / "compress"),
        "run",
        str(recipe_path),
        model,
        "--out",
        str(out),
        "--overwrite",
        "--quiet",
    ]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"{recipe} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "model" / "compress_manifest.json").read_text())
    return {
        "recipe": recipe,
        "model": model,
        "tag": tag,
        "overrides": overrides,
        "commit": _commit(),
        "threads": threads,
        "date": time.strftime("%Y-%m-%d"),
        "run_wall_s": wall,
        "exit_code": proc.returncode,
        "folder": str(out.relative_to(ROOT)),
        "tensors_sha256": tensors_sha256(out / "model"),
        **cell_from_report(report, manifest),
    }


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1e6 else f"{value:.3e}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def render(cells: dict) -> str:
    lines = [
        "# Shipped recipes through `compress run`",
        "",
        "Written by `python bench/recipe_runs.py`. Each row is one `compress run recipes/<recipe>.yaml MODEL` "
        "in its own process; every number is read from that run's report.json. Perplexity: token-level, "
        "held-out Wikipedia, the recipe's `eval.perplexity_windows` 512-token windows, dense baseline from the "
        "same run. Wall times are on a shared 2-core CPU (the run's torch threads in the `threads` column).",
        "",
        "| recipe | model | tag | commit | held-out ppl | dense ppl | ratio | targeted removed | params after | "
        "MB after | compress s | run s | peak RSS GiB | threads |",
        "|" + "---|" * 14,
    ]
    for key in sorted(cells, key=lambda k: (cells[k]["recipe"], cells[k]["model"], cells[k]["date"], cells[k]["tag"])):
        c = cells[key]
        ratio = c["perplexity"] / c["dense_perplexity"] if c["perplexity"] and c["dense_perplexity"] else None
        lines.append(
            "| "
            + " | ".join(
                [
                    c["recipe"] + "".join(f" ({o})" for o in c.get("overrides", [])),
                    c["model"],
                    c["tag"],
                    c["commit"],
                    _fmt(c["perplexity"]),
                    _fmt(c["dense_perplexity"]),
                    _fmt(ratio, 3),
                    f"{c['compression_ratio']:.1%}",
                    _fmt(c["params_after"]),
                    f"{c['bytes_after'] / 1e6:.1f}",
                    f"{c['compression_wall_s']:.0f}",
                    "-" if c["run_wall_s"] is None else f"{c['run_wall_s']:.0f}",  # a run made outside this script
                    f"{c['peak_rss_bytes'] / 2**30:.2f}",
                    str(c["threads"]),
                ]
            )
            + " |"
        )
        if c.get("error"):
            lines.append(f"|  | error in {c['error']['step']}: {c['error']['message']} |" + " |" * 12)
    lines += ["", *compare_tags(cells), *notes(cells), *findings(cells)]
    return "\n".join(lines) + "\n"


def _training(cell: dict) -> dict:
    """The training summary of the run (the stage that trained), or {}."""
    return next(
        (st["training"] for st in cell["stages"] if "training" in st),
        next((st for st in cell["stages"] if st["method"] == "finetune"), {}),
    )


def _peak_compress(cell: dict) -> float:
    """Peak RSS (GiB) by the end of the compression stages (before any evaluation)."""
    return max(st.get("peak_rss_bytes", 0) for st in cell["stages"]) / 2**30


HEALING = (
    "Healing lowrank-40's compression (whitening + sensitivity allocation, 40 % removed)",
    "The same one-shot compression, healed five ways. `global` trains the factors in the whole model on "
    "calibration text (the `finetune` stage); `layer` trains each compressed layer to reproduce the dense "
    "layer's output right after it is compressed (`train: {scope: layer}`: memory is one layer); `lora` "
    "trains rank-16 adapters on the factors and merges them. Training wall time is the training alone; "
    "peak RSS is the process's by the end of compression (before evaluation). Every row sees 96 steps x 2 "
    "windows x 512 tokens = 98,304 tokens (per layer for `layer`).",
    [
        ("lowrank-40@smollm2-135m#v0.1", "global, 64 windows cycled, lr 1e-4"),
        ("lowrank-40-local@smollm2-135m#v0.2", "layer, 64 windows cycled, lr 1e-4"),
        ("lowrank-40-local@smollm2-135m#v0.2-lr1e-3", "layer, 64 windows cycled, lr 1e-3"),
        ("lowrank-40@smollm2-135m#v0.2", "global, 192 windows (one pass), lr 1e-4"),
        ("lowrank-40@smollm2-135m#v0.3-lora-r16", "lora r16, 192 windows (one pass), lr 1e-3"),
    ],
)


def healing_table(cells: dict) -> list[str]:
    """lowrank-40's compression healed several ways (also shown in bench/results/lowrank.md)."""
    lines = []
    title, text, rows = HEALING
    table = [
        [
            label,
            _fmt(cells[key]["perplexity"]),
            _fmt(
                _training(cells[key]).get("trainable_params")
                or _training(cells[key]).get("trainable_params_per_layer_max")
            ),
            f"{_training(cells[key]).get('wall_time_s', 0):.0f}",
            f"{_peak_compress(cells[key]):.2f}",
        ]
        for key, label in rows
        if key in cells
    ]
    if table:
        lines += [
            f"## {title}",
            "",
            text,
            "",
            "| healing | held-out ppl | trainable params (at once) | training s | peak RSS GiB |",
            "|---|---|---|---|---|",
            *("| " + " | ".join(row) + " |" for row in table),
            "",
        ]
    return lines


def findings(cells: dict) -> list[str]:
    lines = healing_table(cells)
    wiki, mix = (
        cells.get("lowrank-20@smollm2-135m#v0.3-calib-wikipedia"),
        cells.get("lowrank-20@smollm2-135m#v0.3-calib-mix"),
    )
    if wiki and mix:
        lines += [
            "## Calibration data: Wikipedia only against the default mix (lowrank-20)",
            "",
            "`recipes/lowrank-20.yaml` calibrated on 64 windows of Wikipedia (as shipped) or on the default mix "
            "(32 Wikipedia + 32 Shakespeare windows), scored on the held-out split of four corpora: Bible and "
            "Python code were seen by neither calibration. Token-level perplexity, 32 windows of 512 tokens "
            "each (Python: the running interpreter's standard library).",
            "",
            "| held-out corpus | dense | Wikipedia-only | x dense | default mix | x dense |",
            "|---|---|---|---|---|---|",
        ]
        for corpus, dense in wiki["dense_perplexity_by_corpus"].items():
            a, b = wiki["perplexity_by_corpus"][corpus], mix["perplexity_by_corpus"][corpus]
            lines.append(f"| {corpus} | {_fmt(dense)} | {_fmt(a)} | {a / dense:.2f} | {_fmt(b)} | {b / dense:.2f} |")
        lines.append("")
    lines += elastic_table(cells)
    fp32, bf16 = cells.get("lowrank-20@smollm2-135m#v0.2"), cells.get("lowrank-20@smollm2-135m#v0.3-bf16")
    if fp32 and bf16:
        lines += [
            "## Stored in bfloat16 (lowrank-20)",
            "",
            f"The same compression (float32 work) saved and evaluated in bfloat16: held-out perplexity "
            f"{_fmt(bf16['perplexity'], 6)} against {_fmt(fp32['perplexity'], 6)} in float32 "
            f"({bf16['perplexity'] / fp32['perplexity'] - 1:+.2%}); safetensors {bf16['bytes_after'] / 1e6:.1f} MB "
            f"against {fp32['bytes_after'] / 1e6:.1f} MB.",
            "",
        ]
    return lines


def elastic_table(cells: dict) -> list[str]:
    """The elastic run scored at each budget (compress.set_budget inside the run) beside the fresh compressions
    at the same budget (lowrank-20 itself at 20 %, bench/elastic.py's fresh-* runs) and the first design's run."""
    elastic = cells.get("lowrank-elastic@smollm2-135m#elastic")
    if not elastic or not elastic.get("budgets"):
        return []
    before = cells.get("lowrank-elastic@smollm2-135m#elastic-factors-only") or {}
    before_at = {e["requested_reduction"]: e["perplexity"] for e in before.get("budgets") or []}
    rows = []
    for entry in elastic["budgets"]:
        budget = entry["requested_reduction"]
        tag = "v0.2" if abs(budget - 0.2) < 1e-9 else f"fresh-{budget:g}"
        fresh = cells.get(f"lowrank-20@smollm2-135m#{tag}")
        ppl, fresh_ppl = entry["perplexity"], fresh["perplexity"] if fresh else None
        versus = f"{ppl / fresh_ppl - 1:+.1%}" if fresh_ppl else "-"
        rows.append(
            f"| {budget:.0%} ({entry['reduction']:.1%}) | {_fmt(ppl)} | {_fmt(fresh_ppl)} | {versus} | "
            f"{_fmt(before_at.get(budget))} |"
        )
    return [
        "## Elastic rank: one run, every budget (lowrank-elastic)",
        "",
        "`recipes/lowrank-elastic.yaml` (lowrank-20's settings, factors, dense weights and loss curves stored for "
        "10-50 %) scored at each budget by `eval.budgets` in the same run (held-out Wikipedia, 32 windows), beside "
        "a fresh `lowrank-20`-style compression at that budget. `before`: the first elastic design, which stored "
        "every matrix as factors only (every budget truncated every matrix). bench/results/elastic.md has the "
        "resizes, sizes, switching latency and healing.",
        "",
        "| budget (achieved) | elastic ppl | fresh ppl | elastic vs fresh | before: factors only |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Checkpoint: {elastic['bytes_after'] / 1e6:.1f} MB (before: {before.get('bytes_after', 0) / 1e6:.1f} MB; "
        f"lowrank-20: {cells.get('lowrank-20@smollm2-135m#v0.2', {}).get('bytes_after', float('nan')) / 1e6:.1f} "
        "MB): the matrices the 10 % budget keeps dense store their dense weight beside their factors.",
        "",
    ]


def _lrc(cells: dict, key: str):
    """How many matrices a run's lowrank stage factorised."""
    return (cells.get(key) or {"stages": [{}]})["stages"][0].get("lrc", "-")


# what a run's number says beside the numbers elsewhere in bench/results, per recipe@model
NOTES = {
    "factorllm-4e2k@smollm2-135m": "factorllm-4e2k: `compress run` gives 124.3 held-out (the same at v0.1 and "
    "v0.2, bit-identical weights), where bench/results/factorllm.md gives 140.2 for this setting (4e2k, cluster, "
    "combine weights, router+experts, 120 steps). bench/factorllm.py runs its cells through its own driver "
    "(quality checkpoints inside training, its own calibration set-up); the gap between the two has not been "
    "traced yet. The number above is the one a user of the recipe gets.",
    "lowrank-40@smollm2-135m": "lowrank-40: v0.1 and v0.2 differ because the recipe changed between them, not the "
    "code: it now heals on 192 windows in one pass (its bench cell's setting) instead of cycling its 64 "
    "compression windows (bench/results/lowrank.md). The v0.3 rows are variants run with `--set` (their "
    "changes are listed in the first table).",
    "lowrank-20@smollm2-135m": "lowrank-20 v0.9-eigh: the whitened factors come from the Gram matrix's "
    "eigendecomposition instead of an SVD (and one Cholesky per input): the same held-out perplexity to 6 "
    "digits, weights different in their last bits. Its compression time (458 s) is not comparable with v0.8's "
    "377 s: a 7B-shaped benchmark ran on the machine's other core meanwhile (its phases: forward passes 218 s "
    "against 177 s, factorising 7 s against 10 s). v1.1-beside-3b (commit 50c99ad, the code just before the "
    "covariances were summed in panels) and v1.2-gram-panels both ran beside a 3B compression on the other "
    "core: their seconds compare with each other (397 -> 372 s, the same weights bit for bit), not with "
    "v1.1-f32-stats' 284 s alone. v1.2-alone (the same code as v1.2-gram-panels, alone on the machine) took "
    "377 s: the environment was reinstalled (transformers 5.25) after v1.1-f32-stats, and its weights differ "
    "from that run's in their last bits (the same held-out perplexity). Traced on 2026-12-05: v1.1-f32-stats' "
    "code (commit 8c4d4b1) and the current code (bc2984e) run one after the other, alone, the same way "
    "(`compress run` of lowrank-20 with eval off, one thread on one core, sampled by py-spy at 25 Hz): 404 s "
    "and 397 s (forward passes 192 s both, planning 140 s both, statistics 45 s and 39 s). The third more "
    "than 284 s is the environment's (the machine or the reinstalled libraries), not the code's. Where the "
    "397 s go (py-spy, own time): nn.Linear matmuls 171 s, attention 39 s, backward 39 s, statistics 45 s, "
    "low-rank forwards 21 s, the curves 24 s. One thread's fp32 matmul ran at 93-96 GFLOP/s that day whether "
    "the weight was 64-byte aligned or not (so transformers 5.25's unaligned tensors are not the cause). "
    "v0.2-paired and v1.3-paired (2026-12-05): v0.2's code (16fc821, the model loaded whole, run from a "
    "worktree with its own `compress`, `kernels` and `eval`) and the current code (a6f3eb1), started together, "
    "one thread each on their own core, the whole recipe (eval included): compression 573 s against 420 s "
    "(0.73x; both slower than alone, sharing the memory bus, and a few minutes of unit tests ran beside them "
    "at the start), the same held-out perplexity (34.4661), whole-run peak RSS 3.83 against 2.49 GiB. The issue's "
    "'compression at least halved' against v0.2 does not hold under one day's conditions: the current code "
    "saves about a quarter. v0.2-paired2 / v1.6-paired and v0.2-paired3 / v1.7-paired (2026-12-05, the same "
    "set-up, v0.2's `compress` put first on the path by a folder holding only a link to it, so that "
    "transformers still imports Hugging Face's `kernels`): lowrank-20 with `calibration.compute_dtype: "
    "bfloat16` (its passes' matmuls under autocast; d0d0923, then 461f9e6 with oneDNN's kernel caches bounded "
    "and the sensitivity tail in float32): compression 537 s against 324 s (0.60x) and 536 s against 329 s "
    "(0.61x), held-out perplexity 34.4661 against 34.4237 and 34.4280 (-0.11 %), last-word accuracy 0.26 "
    "against 0.27 and 0.26. Still short of half. Compression peaks (report.json, the stage's), in memory: "
    "1.51 GB for v1.6-paired, 1.47 GB for v1.7-paired; v1.6-bf16 (7534314 with compute_dtype alone, in a "
    "worktree, beside other work) peaked at 2.40 GB in compression: autocast's cache of cast weights, on "
    "there, kept a bf16 copy of every weight it had cast (off from d0d0923 on). Its held-out perplexity is "
    "v1.6-paired's to every digit (34.4237) and its weights are the same bits: keeping down_proj's inputs and "
    "sharing the layer probe changed nothing in the result. v1.7-disk (the hidden states on disk, beside the "
    "test suite on the other core): the same weights as v1.7-paired, compression peak 0.81 GB, 1.51x the "
    "model's 0.54 GB of fp32 (v1.5-disk in float32: 0.74 GiB, 1.48x). v0.2-paired4 / v1.8-paired and "
    "v0.2-paired5 / v1.8-paired2 (2026-12-05, the same set-up; b47365b and d67a4f2: down_proj's moments taken on "
    "its output side, W C W^T in the sensitivity pass and W C_dc in the calibration; the Fisher's per-batch sums "
    "in float32; the sensitivity tail's head cast to bf16 once; large allocations from glibc's heap, the model "
    "being small against the memory available): compression 534 against 257 s and 523 against 250 s (0.48x "
    "both), held-out perplexity 34.4246 against 34.4661 (-0.12 %), last-word accuracy 0.26, word perplexity "
    "124.0; the two new runs give the same weights. Compression peaks in memory 1.51 and 1.54 GB. v1.8-disk and "
    "v1.8-disk-f32 (beside the test suite; the latter's '+dirty' is the former's uncommitted results files): the "
    "same weights as in memory, compression peaks 0.90 GB (bf16) and 0.87 GB (float32), 1.65x and 1.61x, both "
    "set in the planning, which ran on glibc's heap: the disk placement mapped large allocations only once the "
    "layer walk began. From b8daa90 on a recipe that asks for disk maps them before its plan: v1.9-disk-f32 "
    "peaks at 0.78 GB, 1.44x (the same weights as v1.8-disk-f32), v1.9-disk at 0.86 GB, 1.59x, still set in the "
    "planning: the sensitivity tail's bf16 copy of the head (57 MB), held while the loss gradient is taken "
    "(v1.7-disk, with the tail in float32: 0.81 GB, 1.51x). v0.2-paired6 / v2.0-disk-paired and v0.2-paired7 / "
    "v2.0-disk-paired2 (2026-12-05, the same set-up; ceee290 and 7b9213f: a disk placement writes over freed items'"
    " files instead of filling new ones, raw bytes instead of torch.save; a streamed model's sensitivity tail holds"
    " its head alone, read from the shards in bf16, with no embedding; the backward walk trims the heap per layer "
    "only): lowrank-20 with its hidden states on disk, compression 544 against 265 s (0.49x) and 548 against 272 s "
    "(0.50x), peaks 0.77 and 0.79 GB (1.44x and 1.47x the model's 0.54 GB of fp32; both set before the layer walk),"
    " the weights of v1.8-paired (in memory) bit for bit, held-out 34.4246. Traced alone on the machine (eval off, "
    "not stored here): the same recipe on disk took 292 s before these changes (forward passes 139 s, planning 104 "
    "s; peak 0.87 GB) and 266 s with the files written over and the per-layer trim (121 s, 90 s); in memory 261 s "
    "(118 s, 86 s). v0.2-paired8 / v2.1-disk-paired (d9cad07: the resume state's stream chunks also written over "
    "the files of the layer before, its writing 10 -> 3 s): 544 against 286 s (0.53x), peak 0.78 GB (1.44x), the "
    "same weights; its forward passes took 144 s against 120 and 126 s in the two pairs before (114 s in memory, "
    "v1.8-paired*). On disk every large allocation was a fresh mapping; how much its page faults cost varied from "
    "run to run on this machine (a run alone, traced, took 164 s in its forward passes). v0.2-paired9 / "
    "v2.2-disk-paired (7fcf03f-bf633a3: a mapping threshold set by hand keeps 64 MiB at the heap's top instead of "
    "glibc's 128 KiB; on disk the layer walk maps only blocks above a batch's widest activation, the planning "
    "from 4 MiB; the sensitivity pass reads its inputs a batch at a time; the recipe's batches of 2 windows, "
    "not 4): compression 159 against 408 s (0.39x; v0.2 ran beside the new run's evaluation for most of its "
    "compression), peak 0.78 GB (1.45x, set in the planning), held-out 34.4115 (new weights: the batches "
    "changed the sums' order). v0.2-paired11 / v2.2-disk-paired2, the same set-up: 157 against 408 s (0.38x), peak "
    "0.77 GB (1.44x), the same weights. v0.2-paired10 / v2.2-paired, in memory: 149 against 389 s (0.38x), peak "
    "1.49 GB, the same weights as on disk.",
}


def streaming_note(cells: dict) -> list[str]:
    """lowrank-20 streamed layer by layer against the same recipe loaded whole: memory and time."""
    whole, streamed = cells.get("lowrank-20@smollm2-135m#v0.2"), cells.get("lowrank-20@smollm2-135m#v0.4-streamed")
    if not whole or not streamed:
        return []
    gib = lambda cell: cell["stages"][0]["peak_rss_bytes"] / 2**30  # noqa: E731
    return [
        f"lowrank-20 v0.4-streamed: `compress run` read the model one decoder layer at a time (report.json "
        f"`path: streamed`). Peak RSS by the end of compression: {gib(streamed):.2f} GiB against {gib(whole):.2f} "
        f"GiB loaded whole (v0.2); compression {streamed['compression_wall_s']:.0f} s against "
        f"{whole['compression_wall_s']:.0f} s. The whole process peaks at {streamed['peak_rss_bytes'] / 2**30:.2f} "
        "GiB during the evaluation (lm-eval tasks load the compressed checkpoint, the dense baseline the dense "
        "model). The weights are bit-identical to v0.1's (tensor digest)."
    ]


def notes(cells: dict) -> list[str]:
    present = {f"{c['recipe']}@{c['model']}" for c in cells.values()}
    found = [text for key, text in NOTES.items() if key in present] + streaming_note(cells)
    return ["## Notes", "", *(f"- {text}" for text in found), ""] if found else []


def compare_tags(cells: dict) -> list[str]:
    """Runs of the same recipe and model under different tags: same perplexity? bit-identical weights?"""
    groups: dict[tuple, list[dict]] = {}
    for c in cells.values():  # runs with recipe changes (--set) are other recipes
        groups.setdefault((c["recipe"], c["model"], tuple(c.get("overrides") or ())), []).append(c)
    pairs = [sorted(g, key=lambda c: c["date"] + c["tag"]) for g in groups.values() if len(g) > 1]
    if not pairs:
        return []
    lines = [
        "## The same recipe under different tags",
        "",
        "| recipe | model | tags | held-out ppl | weights |",
        "|---|---|---|---|---|",
    ]
    for group in sorted(pairs, key=lambda g: g[0]["recipe"]):
        first = group[0]
        for other in group[1:]:
            same = _same_weights(first, other)
            lines.append(
                f"| {first['recipe']} | {first['model']} | {first['tag']} -> {other['tag']} | "
                f"{_fmt(first['perplexity'], 6)} -> {_fmt(other['perplexity'], 6)} | "
                f"{'bit-identical' if same else 'differ'} |"
            )
    return lines + [""]


def _same_weights(a: dict, b: dict) -> bool:
    """Bit-identical weights: the same tensor digest (whatever the shard layout), else the same files."""
    if a.get("tensors_sha256") and b.get("tensors_sha256"):
        return a["tensors_sha256"] == b["tensors_sha256"]
    return a["weights_sha256"] == b["weights_sha256"]


def tensors_sha256(model_folder: Path) -> str:
    """One sha256 over every tensor of a checkpoint (name, dtype, shape, bytes; sorted by name): equal for the
    same weights however they are sharded."""
    import hashlib

    from safetensors import safe_open

    files = {}
    for path in sorted(model_folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            files.update(dict.fromkeys(handle.keys(), path))
    digest = hashlib.sha256()
    for name in sorted(files):
        with safe_open(files[name], framework="pt") as handle:
            tensor = handle.get_tensor(name)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def merge(roots: list[Path]) -> dict:
    """The runs stored under other checkouts (e.g. worktrees of older commits), re-read from their reports."""
    cells = load_cells(STORE)
    for root in roots:
        for key, cell in load_cells(root / "bench" / "results" / "recipe_runs.json").items():
            folder = root / cell["folder"]
            if cell["folder"] != run_folder(cell["recipe"], cell["model"], cell["tag"]):
                continue  # a cell given another tag after its run: its folder now holds the run under its old tag
            if not (folder / "report.json").is_file():
                print(f"{root}: {key} has no run folder there (a copy of another store's cell): skipped")
                continue
            report = json.loads((folder / "report.json").read_text())
            manifest = json.loads((folder / "model" / "compress_manifest.json").read_text())
            cells[key] = {**cell, **cell_from_report(report, manifest)}
            if not cells[key].get("tensors_sha256") and (folder / "model").is_dir():
                cells[key]["tensors_sha256"] = tensors_sha256(folder / "model")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="recipe names (files in recipes/, without .yaml)")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="CHECKOUT",
        help="instead of running: take the runs stored under these checkouts into this store",
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tag", required=True, help="a label for this series of runs (e.g. the code version)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rerun", action="store_true", help="run again even if the store has the run")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="change one recipe field for these runs, e.g. stages.0.train.lr=1.0e-3",
    )
    args = parser.parse_args()
    if args.merge:
        save_cells(merge(args.merge), STORE, MARKDOWN, render)
        return
    cells = load_cells(STORE)
    for recipe in args.recipes:
        key = key_of(recipe, args.model, args.tag)
        if key in cells and not args.rerun:
            continue
        try:
            cells[key] = run_recipe(recipe, args.model, args.tag, args.threads, args.overrides)
        except RuntimeError as exc:
            print(exc, file=sys.stderr, flush=True)
            continue
        save_cells(cells, STORE, MARKDOWN, render)
        c = cells[key]
        print(f"{key}: ppl {c['perplexity']} (dense {c['dense_perplexity']}), {c['run_wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
