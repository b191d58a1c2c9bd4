"""Activation-aware low-rank factorisation on SmolLM2-135M -> bench/results/lowrank.md (+ lowrank.json).

Rows build up one idea at a time (columns: 20 % and 40 % of the q/k/v/o/gate/up/down parameters
removed). Each (row, reduction) runs in its own subprocess, so wall time and peak RSS are that
cell's alone. Results accumulate in lowrank.json (a cell is re-measured only when asked), and the
markdown marks cells not measured yet as "pending".

Protocol (README, "Measurement protocol"): perplexity is token-level exp(mean NLL) over the first --windows
non-overlapping 512-token windows of held-out Wikipedia (index % 4 == 0); calibration is
--samples x --seq-len tokens from the calibration split; the dense baseline is measured here too.

    python bench/lowrank.py                                   # every pending cell (hours on 2 CPU cores)
    python bench/lowrank.py --rows svd whiten --reductions 0.2
    python bench/lowrank.py --row whiten 0.2 --windows 2 --samples 4 --seq-len 128   # one cell, JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cells import forwarded_flags, load_cells, run_cells, save_cells
from recipe_runs import healing_table

RESULTS = Path(__file__).parent / "results"
TARGETS = [r"re:.*\.(q|k|v|o|gate|up|down)_proj$"]
REDUCTIONS = (0.2, 0.4)

# row name -> (description, stage list builder)
ROWS = {
    "dense": "dense model",
    "svd": "plain SVD (data-free)",
    "asvd": "ASVD (columns scaled by mean abs(x)^0.5), dense calibration",
    "whiten": "whitening (SVD-LLM), dense calibration",
    "whiten+seq": "whitening, sequential calibration",
    "dense-target": "+ dense target, shrinkage 0.1 diag",
    "dense-target-sub": "dense target, shrinkage 0.1, sub-layer sequential calibration (o_proj fitted after q/k/v "
    "are compressed, down_proj after gate/up; the dense stream runs through an untouched copy "
    "of the layer)",
    "refine": "whitening sequential, shrinkage 0.1, + least-squares refit of both factors against the dense "
    "outputs (on top of dense-target it would be a no-op: that closed form is already the optimum)",
    "refine-sub": "as refine, with sub-layer sequential calibration (the refit's dense target then sees the "
    "inputs that really occur; compare dense-target-sub, the closed-form optimum of the same objective)",
    "refine-noshrink": "as refine but shrinkage 0 (shows the over-fit of the unregularised refit)",
    "allocation": "whitening (dense calibration) + sensitivity allocation (Fisher-weighted output error, global "
    "budget)",
    "healing": "the allocation row's checkpoint + 96 steps of fine-tuning every low-rank factor (AdamW, lr 1e-4, "
    "cosine, batch 2 x 512 tokens: 98,304 tokens, one pass over 192 calibration windows)",
    "allocation-dt": "dense-target-sub + sensitivity allocation (ranks chosen as in the allocation row, from "
    "curves with shrinkage 0.1; factors from the sub-layer dense-target fit)",
    "healing-dt": "the allocation-dt row's checkpoint + the healing row's 96 fine-tuning steps",
    "healing-dt-kd": "as healing-dt, but trained on the KL divergence to the dense model's next-token "
    "distribution (knowledge distillation) instead of the next-token loss",
    "attention-50": "q/k/v/o only, 50 % of their parameters removed (whitening + sensitivity allocation)",
}
HEALING_STEPS = 96
HEALING_WINDOWS = 192  # healing trains on more calibration text than the 64 windows compression saw
# One column per row: attention-50 removes 50 % of the attention parameters only.
ROW_REDUCTIONS = {"dense": (0.0,), "attention-50": (0.5,)}
# Ranks, not the backend, decide speed: latency is timed for uniform ranks (the data-free svd row,
# compressed on the fly), the allocated ranks and attention-only. Rows in SAVED_ROWS keep their
# checkpoint in the compress cache (for latency and for the healing rows).
LATENCY_ROWS = ("svd", "allocation", "allocation-dt", "attention-50")
SAVED_ROWS = ("allocation", "allocation-dt", "attention-50")
# healing row -> the saved row whose checkpoint it fine-tunes
HEALS = {"healing": "allocation", "healing-dt": "allocation-dt", "healing-dt-kd": "allocation-dt"}


def stages_for(row: str, reduction: float) -> list[dict]:
    base = {"method": "lowrank", "targets": TARGETS, "reduction": reduction}
    if row == "dense":
        return []
    if row == "svd":
        return [base]
    if row == "attention-50":
        return [
            {
                "method": "lowrank_attention",
                "targets": [r"re:.*\.self_attn\.(q|k|v|o)_proj$"],
                "reduction": 0.5,
                "backend": "whiten",
                "sequential": False,
                "allocation": "sensitivity",
                "sensitivity_windows": 16,
            }
        ]
    if row == "asvd":
        return [{**base, "backend": "asvd", "sequential": False}]
    if row == "whiten":
        return [{**base, "backend": "whiten", "sequential": False}]
    if row == "whiten+seq":
        return [{**base, "backend": "whiten"}]
    if row == "dense-target":
        return [{**base, "backend": "whiten_dense_target", "shrinkage": 0.1}]
    if row == "dense-target-sub":
        return [{**base, "backend": "whiten_dense_target", "shrinkage": 0.1, "sublayer": True}]
    if row == "refine":
        return [{**base, "backend": "whiten", "refine": True, "shrinkage": 0.1}]
    if row == "refine-sub":
        return [{**base, "backend": "whiten", "refine": True, "shrinkage": 0.1, "sublayer": True}]
    if row == "refine-noshrink":
        return [{**base, "backend": "whiten", "refine": True}]
    # allocation was first measured on whitening with dense calibration (the best uniform row before
    # sub-layer calibration); allocation-dt puts the same allocation on dense-target-sub
    allocated = {
        **base,
        "backend": "whiten",
        "sequential": False,
        "allocation": "sensitivity",
        "sensitivity_windows": 16,
    }
    if row == "allocation":
        return [allocated]
    if row == "allocation-dt":
        return [{**allocated, "backend": "whiten_dense_target", "shrinkage": 0.1, "sequential": True, "sublayer": True}]
    if row in HEALS:  # run on the healed row's saved checkpoint (see run_cell)
        return [
            {
                "method": "finetune",
                "steps": HEALING_STEPS,
                "lr": 1e-4,
                "batch_size": 2,
                "warmup_steps": 5,
                "schedule": "cosine",
                "eval_windows": 4,
                "loss": "distill" if row.endswith("-kd") else "next_token",
            }
        ]
    raise SystemExit(f"unknown row {row!r}; known: {', '.join(ROWS)}")


def run_cell(row: str, reduction: float, windows: int, samples: int, seq_len: int, model_id: str) -> dict:
    import torch

    from compress.calibration import lazy_calibration_windows
    from compress.eval.corpora import load_documents
    from compress.eval.perplexity import perplexity
    from compress.eval.windows import token_windows
    from compress.job import count_params
    from compress.methods.base import StageContext
    from compress.models import load_model
    from compress.pipeline import compress_model
    from compress.recipe import parse_recipe
    from compress.utils import peak_rss_bytes

    torch.manual_seed(0)
    if row in HEALS:  # heal the saved row's model instead of compressing it again
        from compress.models import load_folder

        folder = _checkpoint(HEALS[row], reduction)
        if not folder.is_dir():
            raise SystemExit(f"{folder} is missing: run the cell {HEALS[row]}@{reduction} first")
        model, tokenizer, _ = load_folder(folder)
        samples = HEALING_WINDOWS
        teacher = load_model(model_id).model if row.endswith("-kd") else None  # dense, for distillation
    else:
        loaded = load_model(model_id)
        model, tokenizer = loaded.model, loaded.tokenizer
        teacher = None
    out = {
        "row": row,
        "reduction": reduction,
        "windows": windows,
        "calibration": f"{samples}x{seq_len}",
        "params_before": count_params(model),
    }
    start = time.perf_counter()
    stages = stages_for(row, reduction)
    if stages:
        recipe = parse_recipe(
            {
                "name": "bench",
                "stages": stages,
                "calibration": {"corpus": "wikipedia", "samples": samples, "seq_len": seq_len},
            }
        )
        calib = lazy_calibration_windows(tokenizer, recipe.calibration)

        ctx = StageContext(
            tokenizer, calib, progress=False, teacher=None if teacher is None else teacher.eval().requires_grad_(False)
        )
        results = compress_model(model, recipe, ctx)
        out["achieved_reduction"] = results[0].summary.get("achieved_reduction")
        out["stage_summaries"] = [
            {k: v for k, v in r.summary.items() if isinstance(v, (int, float, str))} for r in results
        ]
    out["compress_wall_s"] = time.perf_counter() - start
    out["params_after"] = count_params(model)
    held = token_windows(tokenizer, load_documents("wikipedia", "heldout"), 512, windows)
    out["perplexity"] = perplexity(model, held, batch_size=4, progress=False)["perplexity"]
    out["wall_s"] = time.perf_counter() - start
    out["peak_rss_bytes"] = peak_rss_bytes()
    if row in SAVED_ROWS:
        from compress.checkpoint import mark_compressed
        from compress.models import save_folder

        mark_compressed(model, recipe.model_dump(mode="json"))  # reloads as the compressed modules
        save_folder(model, tokenizer, _checkpoint(row, reduction))
    return out


def _checkpoint(row: str, reduction: float) -> Path:
    from compress.eval.cache import compress_cache_dir

    return compress_cache_dir() / "bench" / "lowrank" / f"{row}@{reduction}"


def run_latency(row: str, reduction: float, model_id: str, repeats: int) -> dict:
    """Dense vs the saved checkpoint of (row, reduction): one 512-token forward, 64 greedy tokens."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from latency import compare_latency

    from compress.eval.corpora import load_documents
    from compress.eval.windows import token_windows
    from compress.models import load_folder, load_model

    dense = load_model(model_id)
    if row in SAVED_ROWS:
        folder = _checkpoint(row, reduction)
        if not folder.is_dir():
            raise SystemExit(f"{folder} is missing: run the cell {row}@{reduction} first")
        compressed, _, _ = load_folder(folder)
    else:
        from compress.methods.base import StageContext
        from compress.pipeline import compress_model
        from compress.recipe import parse_recipe

        compressed = load_model(model_id).model
        recipe = parse_recipe({"name": "latency", "stages": stages_for(row, reduction)})
        compress_model(compressed, recipe, StageContext(dense.tokenizer, lambda: None, progress=False))
    ids = token_windows(dense.tokenizer, load_documents("wikipedia", "heldout"), 512, 1)
    timing = compare_latency({"dense": dense.model, "compressed": compressed}, ids, repeats=repeats)
    return {
        "row": row,
        "reduction": reduction,
        "threads": torch.get_num_threads(),
        **timing,
        "forward_ratio": timing["compressed"]["forward_s"] / timing["dense"]["forward_s"],
        "decode_ratio": timing["compressed"]["decode_s"] / timing["dense"]["decode_s"],
    }


NOTES = """## What the table says (2026-12-02)

- The dense model here is the bundled SmolLM2-135M GGUF (the instruct build, de-quantised): 21.49 on
  these 32 windows, against the 19.07 that issue 3 quotes for its prototype. Compare ratios, not
  absolute values, with the issue's numbers.
- Data-free and scaling-only methods destroy this model: plain SVD 2.6e7 / 3.3e7, ASVD 7.9e5 / 7.4e7.
- Whitening (SVD-LLM) is the first method that survives: 110 / 542 on dense calibration (issue 3's
  SVD-LLM: 99.1 / 421). Sequential calibration alone takes it to 102 / 354.
- Matching the dense layer's output needs the right inputs. At layer granularity (rows dense-target
  and refine) o_proj and down_proj are fitted, through the cross term W C_dc C_cc^-1, to inputs that no
  longer occur once q/k/v and gate/up are compressed: 13,399 and 15,400 at 40 % (refine: 5,321 at
  20 %), worse than plain whitening. Sub-layer calibration (`sublayer: true`: o_proj calibrated after q/k/v are
  compressed, down_proj after gate/up; the dense stream runs through an untouched copy of the layer) fixes it:
  dense-target-sub gives 73.9 / 178.5 with uniform ranks. The least-squares refit of both factors
  against the dense outputs, on the same sub-layer statistics (row refine-sub), takes sequential
  whitening to 75.0 / 182: next to the closed form (73.9 / 178.5), as expected, since one
  alternating sweep moves towards the optimum that dense-target computes exactly.
- Sensitivity allocation is the other large step. Ranks come from Fisher-weighted output-error curves
  on 16 calibration windows under one global budget; only 89 of the 210 matrices are factorised at 20 %
  (134 at 40 %), the rest stay dense. On plain whitening it gives 38.3 / 226; on dense-target-sub
  (row allocation-dt, `lowrank-20.yaml`'s setting) **34.5 / 113.4**: both no-fine-tuning targets (<= 50,
  <= 150) are met, and against SVD-LLM measured here (110 / 542) that is 3.2x / 4.8x lower perplexity.
  Each allocation-dt cell takes about 18 minutes on one CPU thread at 3.7 GiB peak RSS.
- Healing: 96 AdamW steps on every low-rank factor (98,304 tokens, one pass over 192 calibration
  windows, about 20 minutes on one thread; within the 30-minute limit). Next-token loss: allocation@40 %
  226 -> 55.9; allocation-dt 113 -> 64.5 at 40 % and 34.5 -> 28.2 at 20 %. A better start does not
  heal better: at 40 % the dense-target model ends lower on its training windows (loss 2.99 against
  3.02) and higher on held-out text; with 98k tokens for 38M trainable parameters, what the healed
  model generalises decides, not where it started. `lowrank-40.yaml` therefore heals the
  plain-whitening allocation. Distillation (`loss: distill`, KL to the dense model's
  next-token distribution; row healing-dt-kd) does not help at 40 %: 65.2 against 64.5. It narrows the
  gap (training-window loss 3.43 instead of 2.99) without lowering held-out perplexity, and the
  teacher's forward pass made the 96 steps take 31 minutes (another job shared the machine). Healed
  targets: 20 % reaches 28.21 against <= 28 (0.75 % short); 40 % reaches 55.9 against <= 50 (12 %
  short).
- Latency on CPU (1 thread, fp32) follows the FLOPs only loosely. At 20 % with uniform ranks the
  factorised model is slower than dense: two thin matmuls replace one, and they save only 20 % of the
  multiply-adds. Allocation keeps most matrices dense and cuts the others deeper. With allocation-dt's
  ranks the 512-token forward pass takes 0.91x dense at 20 % and 0.81x at 40 %; 64-token decoding
  1.01x and 0.88x (plain-whitening allocation at 40 %: 0.91x and 0.91x).
  At batch 1, 64-token greedy decoding is dominated by per-op overhead, not by FLOPs. The dense timings
  differ between cells because other jobs shared the machine; each ratio is interleaved within one
  process.
- Attention only: removing 50 % of the q/k/v/o parameters with whitening and sensitivity allocation
  costs 21.49 -> 27.35 (1.27x dense), with no training. That removes 13.3M parameters: 50 % of 26.5M,
  or 12.5 % of all seven projections' parameters.
- Not measured (CPU time): refine-noshrink (the unregularised refit), the healing
  row at 20 % on plain-whitening allocation, and distillation at 20 % (stopped to leave time for CI).
  The allocation@20 % latency cell is pending because that checkpoint was not kept; allocation-dt's
  ranks come from the same procedure. The earlier smoke cells (2,048 calibration tokens, 2 windows)
  are dropped from the table.
"""


# reduction -> (target without fine-tuning, target with <= 30 min of healing); issue 3
TARGETS_PPL = {0.2: (50.0, 28.0), 0.4: (150.0, 50.0)}
SVD_LLM_ISSUE = {0.2: 99.1, 0.4: 421.2}  # issue 3's SVD-LLM numbers (dense 19.07 there)
RECIPE_ROWS = {"lowrank-20.yaml": ("allocation-dt", 0.2), "lowrank-40.yaml": ("healing", 0.4)}


def outcome(cells: dict) -> list[str]:
    """Best measured row per column against issue 3's targets, and the shipped recipes' rows."""
    dense = cells.get("dense@0.0")
    lines = ["## Outcome against the targets", ""]
    for red, (one_shot, healed) in TARGETS_PPL.items():
        measured = {row: cells[f"{row}@{red}"] for row in ROWS if f"{row}@{red}" in cells}
        for label, rows, target in (
            ("without fine-tuning", [r for r in measured if r not in HEALS], one_shot),
            ("with healing", [r for r in measured if r in HEALS], healed),
        ):
            if not rows:
                lines.append(f"- {red:.0%} {label}: target <= {target:g}, nothing measured yet.")
                continue
            best = min(rows, key=lambda r: measured[r]["perplexity"])
            ppl = measured[best]["perplexity"]
            verdict = "met" if ppl <= target else f"missed by {ppl / target - 1:.1%}"
            ratio = f", {ppl / dense['perplexity']:.2f}x dense" if dense else ""
            lines.append(f"- {red:.0%} {label}: target <= {target:g}; best `{best}` {ppl:.4g}{ratio}: {verdict}.")
    for recipe, (row, red) in RECIPE_ROWS.items():
        c = cells.get(f"{row}@{red}")
        whiten = cells.get(f"whiten@{red}")
        if c is None:
            lines.append(f"- `recipes/{recipe}` = row `{row}` at {red:.0%}: pending.")
            continue
        against = f"whitening (SVD-LLM) measured here {whiten['perplexity']:.4g}, " if whiten else ""
        lines.append(
            f"- `recipes/{recipe}` = row `{row}` at {red:.0%}: {c['perplexity']:.4g} against {against}"
            f"issue 3's SVD-LLM {SVD_LLM_ISSUE[red]:g}."
        )
    return lines + [""]


# shipped recipe -> the bench cell it reproduces
RECIPE_CELLS = {"lowrank-20": "allocation-dt@0.2", "lowrank-40": "healing@0.4", "attention-50": "attention-50@0.5"}
# why a `compress run` of a recipe measured something else than its bench cell, per (recipe, run tag)
DIFFERENCES = {
    ("lowrank-40", "v0.1"): "that recipe (before this change) healed on its 64 compression windows cycled three times; "
    "the bench cell heals on 192 windows, one pass. The recipe now does the same as the cell "
    "(calibration 192 windows, `calibration_windows: 64` for the compression)",
}


def recipe_runs_section(cells: dict) -> list[str]:
    """The shipped recipes' numbers from `compress run` (bench/recipe_runs.py) beside the cells they reproduce."""
    store = RESULTS / "recipe_runs.json"
    runs = json.loads(store.read_text()) if store.is_file() else {}
    rows = []
    for run in sorted(runs.values(), key=lambda r: (r["recipe"], r["date"], r["tag"])):
        key = RECIPE_CELLS.get(run["recipe"])
        if run.get("overrides") or (key is None and not run["recipe"].startswith("lowrank")):
            continue  # variants (`--set`) are in recipe_runs.md: only the recipes as shipped are compared here
        bench = cells.get(key, {}).get("perplexity") if key else None
        cli = run["perplexity"]
        if bench is None:
            verdict = "no bench cell"
        elif f"{bench:.4g}" == f"{cli:.4g}":
            verdict = "agree (same digits)"
        else:
            verdict = f"differ: {DIFFERENCES.get((run['recipe'], run['tag']), 'unexplained')}"
        label = run["recipe"] + "".join(f" ({o})" for o in run.get("overrides", []))
        rows.append(
            [
                label,
                run["tag"],
                key or "-",
                "-" if bench is None else f"{bench:.4g}",
                f"{cli:.4g}",
                f"{run['dense_perplexity']:.4g}",
                verdict,
            ]
        )
    if not rows:
        return []
    from compress.report import md_table

    return [
        "## The shipped recipes through `compress run`",
        "",
        "Each recipe run end to end with `compress run recipes/<recipe>.yaml smollm2-135m` (dense and compressed "
        "evaluation, report) by `bench/recipe_runs.py`; held-out perplexity from the run's report.json, beside "
        "the bench cell the recipe reproduces. Tags: `v0.1` = the code before the method-protocol refactor, "
        "`v0.2` = after it. Only the recipes as shipped; bench/results/recipe_runs.md also has their variants "
        "(calibration data, dtype, LoRA healing), sizes, times and memory.",
        "",
        md_table(
            ["recipe", "tag", "bench cell", "bench ppl", "`compress run` ppl", "dense (same run)", "verdict"], rows
        ),
        "",
        *("#" + line if line.startswith("## ") else line for line in healing_table(runs)),
    ]


def render(cells: dict) -> str:
    from compress.report import md_table

    def cell(row, red):
        c = cells.get(f"{row}@{red}")
        if c is None:
            return "pending"
        return (
            f"{c['perplexity']:.4g} ({c['windows']} win, calib {c['calibration']}, "
            f"{c['wall_s']:.0f} s, {c['peak_rss_bytes'] / 2**30:.2f} GiB)"
        )

    table = [[name, ROWS[name]] + [cell(name, r) for r in REDUCTIONS] for name in ROWS if name not in ROW_REDUCTIONS]
    latency = []
    for row in LATENCY_ROWS:
        for red in ROW_REDUCTIONS.get(row, REDUCTIONS):
            c = cells.get(f"latency:{row}@{red}")
            latency.append(
                [row, f"{red:.0%}"]
                + (
                    ["pending"] * 4
                    if c is None
                    else [
                        f"{c['dense']['forward_s']:.3f} / {c['compressed']['forward_s']:.3f}",
                        f"{c['forward_ratio']:.2f}",
                        f"{c['dense']['decode_s']:.2f} / {c['compressed']['decode_s']:.2f}",
                        f"{c['decode_ratio']:.2f}",
                    ]
                )
            )
    measured = [k for k in cells]
    lines = [
        "# Activation-aware low-rank on SmolLM2-135M",
        "",
        "Written by `python bench/lowrank.py`. Targets: q/k/v/o/gate/up/down of all 30 layers. Cell: token-level "
        "held-out Wikipedia perplexity (first N 512-token windows; protocol target N = 32, calibration 64 x 512 from "
        "the calibration split), then windows / calibration actually used, wall time (compress + eval) and peak "
        "RSS of that cell's own process. `pending` = not measured yet. One torch thread per cell.",
        "",
        md_table(["row", "what", "20 %", "40 %"], table),
        "",
        f"Dense baseline: {cell('dense', 0.0)}.",
        "",
        f"Attention only (`attention-50`, {ROWS['attention-50']}): {cell('attention-50', 0.5)}.",
        "",
        "## CPU latency, compressed vs dense",
        "",
        "Median of 5 interleaved runs in one process (1 torch thread, fp32, after one warm-up each): one forward "
        "pass over a 512-token window, and 64 tokens of greedy decoding (KV cache) after a 16-token prompt.",
        "",
        md_table(
            ["row", "removed", "forward s (dense / compressed)", "ratio", "decode s (dense / compressed)", "ratio"],
            latency,
        ),
        "",
        f"Measured cells: {', '.join(measured) if measured else 'none'}. Cells measured with fewer windows or a "
        "smaller calibration set than the protocol are smoke tests, not results.",
        "",
        "Reference numbers from issue 3 (earlier prototype, same protocol): plain SVD 3.1e7 / 2.5e7; WeLore "
        "22,305 / 177,604; ASVD 466,158 / 1.4e7; SVD-LLM whitening 99.1 / 421.2; sequential dense-target 294 at "
        "40 %; + 0.1 diag shrinkage 74.2 / 191.7.",
        "",
        *outcome(cells),
        *recipe_runs_section(cells),
        NOTES,
        "",
    ]
    return "\n".join(lines)


def _save(cells: dict) -> None:
    save_cells(cells, RESULTS / "lowrank.json", RESULTS / "lowrank.md", render)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--row", nargs=2, metavar=("ROW", "REDUCTION"), help="run one cell, print JSON")
    parser.add_argument("--latency", nargs=2, metavar=("ROW", "REDUCTION"), help="run one latency cell, print JSON")
    parser.add_argument("--rows", nargs="*", default=list(ROWS))
    parser.add_argument("--reductions", nargs="*", type=float, default=list(REDUCTIONS))
    parser.add_argument("--latency-cells", action="store_true", help="also time every LATENCY_ROWS checkpoint")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--force", action="store_true", help="re-measure cells already in lowrank.json")
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the json")
    args = parser.parse_args()
    if args.row:
        print(
            json.dumps(run_cell(args.row[0], float(args.row[1]), args.windows, args.samples, args.seq_len, args.model))
        )
        return
    if args.latency:
        print(json.dumps(run_latency(args.latency[0], float(args.latency[1]), args.model, args.repeats)))
        return
    cells = load_cells(RESULTS / "lowrank.json")

    def pending(key):
        return args.force or key not in cells

    if not args.render:
        plan = [f"{row}@{red}" for row in args.rows for red in ROW_REDUCTIONS.get(row, args.reductions)]
        run_cells(
            plan,
            cells,
            lambda key: [
                sys.executable,
                __file__,
                "--row",
                *key.split("@"),
                *forwarded_flags(args, ("windows", "samples", "seq_len", "model")),
            ],
            _save,
            lambda c: f"ppl {c['perplexity']:.4g}",
            lambda key: not pending(key),
        )
    if args.latency_cells and not args.render:
        plan = []
        for row in LATENCY_ROWS:
            for red in ROW_REDUCTIONS.get(row, args.reductions):
                if f"{row}@{red}" not in cells:
                    continue
                if row in SAVED_ROWS and not _checkpoint(row, red).is_dir():
                    print(
                        f"latency:{row}@{red}: skipped, no saved checkpoint (re-run the cell {row}@{red})",
                        file=sys.stderr,
                    )
                    continue
                plan.append(f"latency:{row}@{red}")
        run_cells(
            plan,
            cells,
            lambda key: [
                sys.executable,
                __file__,
                "--latency",
                *key.removeprefix("latency:").split("@"),
                *forwarded_flags(args, ("model", "repeats")),
            ],
            _save,
            lambda c: f"forward x{c['forward_ratio']:.2f}",
            lambda key: not pending(key),
        )
    _save(cells)


if __name__ == "__main__":
    main()
