"""Elastic rank on SmolLM2-135M and Gemma-3-270M -> bench/results/elastic.md (+ elastic.json).

Every number comes out of the command line: `compress run recipes/lowrank-elastic.yaml` once (its report scores
the checkpoint at 10..50 % through compress.set_budget), `compress run recipes/lowrank-20.yaml` with
`stages.0.reduction` set to each budget for the fresh compressions it is compared with (bench/recipe_runs.py
keeps those runs), and `compress resize` for each budget (wall time, checkpoint bytes, and the resized
checkpoint's perplexity through `compress eval`). Healing: `recipes/lowrank-elastic-healed.yaml` (one run for
20-40 %, Starbucks' summed loss, and with `rule: sample`, Maestro's ordered dropout) against a fresh compression
healed at each budget separately (the same 96 steps and tokens). Switching: the forward latency at each budget
of one loaded elastic model, interleaved with the dense model in one process, and a bit-identity check of
switching back and forth. Anchored: the same elastic recipe with a second factor set fit for the 50 % budget
(`elastic: {calibrate_on: [0.5], fit: anchored}`), resized and scored like the first.

    python bench/elastic.py                 # runs what is missing (hours on CPU), then writes the results
    python bench/elastic.py --model gemma3-270m   # another model: the budget grid, anchored run and switching
    python bench/elastic.py --model gemma3-270m --healing   # ... and the healing runs (hours)
    python bench/elastic.py --anchored-only # resize and score the anchored run alone (no `compress run`)
    python bench/elastic.py --render        # only rewrite the markdown from the json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cells import load_cells, save_cells  # noqa: E402
from recipe_runs import ROOT, STORE, key_of, run_recipe  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BUDGETS = (0.1, 0.2, 0.3, 0.4, 0.5)
HEALED = (0.2, 0.3, 0.4)
MODEL = "smollm2-135m"  # the model of the full grid; other models get the budget table alone
MODEL_NAMES = {"gemma3-270m": "Gemma-3-270M"}
HEAL_STAGE = (
    "{method: finetune, targets: [LowRankLinear], steps: 96, lr: 1.0e-4, schedule: cosine, warmup_steps: 5, "
    "batch_size: 2}"
)


# token-level perplexity is all these runs are compared on: no lm-eval tasks, no dense baseline (the shipped
# runs in bench/results/recipe_runs.md have both)
PPL_ONLY = ["eval.tasks=[]", "eval.limit=null", "eval.compare_dense=false"]


# the anchored fit: the 50 % budget gets factors of its own, fit on the 50 % model's stream
ANCHORED = (
    "lowrank-elastic",
    "elastic-anchored50",
    ["stages.0.elastic.calibrate_on=[0.5]", "stages.0.elastic.fit=anchored", *PPL_ONLY],
)


def runs_plan(model: str, healing: bool = True) -> list[tuple[str, str, list[str]]]:
    """(recipe, tag, overrides) of every `compress run` this benchmark reads for ``model`` (the healing runs:
    hours on CPU)."""
    fresh = [("lowrank-20", f"fresh-{b:g}", [f"stages.0.reduction={b}", *PPL_ONLY]) for b in BUDGETS]
    # on SmolLM2, lowrank-20 itself is the fresh 20 % compression (its shipped run, bench/results/recipe_runs.md)
    plan = [
        ("lowrank-elastic", "elastic", PPL_ONLY),
        ANCHORED,
        *(r for r in fresh if model != MODEL or r[1] != "fresh-0.2"),
    ]
    if not healing:
        return plan
    plan += [
        ("lowrank-elastic-healed", "elastic-sum", PPL_ONLY),
        ("lowrank-elastic-healed", "elastic-sample", ["stages.1.elastic.rule=sample", *PPL_ONLY]),
    ]
    plan += [
        (
            "lowrank-20",
            f"fresh-{b:g}-healed",
            [
                f"stages.0.reduction={b}",
                f"stages.1={HEAL_STAGE}",
                "stages.0.calibration_windows=64",
                "calibration.samples=192",
                *PPL_ONLY,
            ],
        )
        for b in HEALED
    ]
    return plan


def ensure_runs(threads: int, model: str, healing: bool) -> dict:
    cells = load_cells(STORE)
    for recipe, tag, overrides in runs_plan(model, healing):
        key = key_of(recipe, model, tag)
        if key in cells:
            continue
        print(f"running {key} ...", file=sys.stderr, flush=True)
        cells[key] = run_recipe(recipe, model, tag, threads, overrides)
        from recipe_runs import MARKDOWN, render

        save_cells(cells, STORE, MARKDOWN, render)
    return cells


def fresh_cell(cells: dict, budget: float, model: str = MODEL) -> dict | None:
    """The plain (not elastic) compression at ``budget``: on SmolLM2, lowrank-20's shipped run at 20 %."""
    if budget == 0.2 and model == MODEL:
        return next((c for k, c in sorted(cells.items()) if k.startswith(f"lowrank-20@{MODEL}#v0.")), None)
    return cells.get(key_of("lowrank-20", model, f"fresh-{budget:g}"))


def measure_resizes(elastic_folder: Path, threads: int) -> list[dict]:
    """`compress resize` to each budget (wall time of the command and of the resize itself), then `compress eval`;
    also `--fixed` (that budget only): its bytes."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cli = str(Path(sys.executable).parent / "compress")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in BUDGETS:
            target, fixed = Path(tmp) / f"r{budget:g}", Path(tmp) / f"f{budget:g}"
            resize = [cli, "resize", str(elastic_folder), "--reduction", str(budget)]
            subprocess.run([*resize, "--fixed", "--out", str(fixed)], check=True, capture_output=True, env=env)
            start = time.perf_counter()
            proc = subprocess.run([*resize, "--out", str(target)], capture_output=True, text=True, env=env)
            command_s = time.perf_counter() - start
            if proc.returncode:
                raise SystemExit(f"resize {budget} failed: {proc.stderr}")
            resize_s = float(proc.stdout.split(") in ")[1].split(" s:")[0])
            scores = Path(tmp) / f"e{budget:g}.json"
            subprocess.run(
                [cli, "eval", str(target), "--tasks", "--windows", "32", "--quiet", "--json", str(scores)],
                check=True,
                capture_output=True,
                env=env,
            )
            out.append(
                {
                    "budget": budget,
                    "command_s": command_s,
                    "resize_s": resize_s,
                    "bytes": sum(p.stat().st_size for p in target.glob("*.safetensors")),
                    "fixed_bytes": sum(p.stat().st_size for p in fixed.glob("*.safetensors")),
                    "perplexity": json.loads(scores.read_text())["perplexity"]["perplexity"],
                }
            )
    return out


def measure_switching(elastic_folder: Path, threads: int, model_id: str = MODEL) -> dict:
    """Forward latency at each budget of one loaded model vs the dense one (interleaved), and bit-identity."""
    import torch

    torch.set_num_threads(threads)
    from latency import compare_latency

    import compress  # noqa: F401  (the checkpoint format)
    from compress.elastic import set_budget
    from compress.eval.corpora import load_documents
    from compress.eval.windows import token_windows
    from compress.models import load_folder, load_model

    model, tokenizer, _ = load_folder(elastic_folder)
    dense = load_model(model_id).model
    ids = token_windows(tokenizer, load_documents("wikipedia", "heldout"), 512, 1)
    rows = []
    for budget in BUDGETS:
        set_budget(model, budget)
        timing = compare_latency({"dense": dense, "elastic": model}, ids, new_tokens=16, repeats=5)
        rows.append(
            {
                "budget": budget,
                "forward_ratio": timing["elastic"]["forward_s"] / timing["dense"]["forward_s"],
                "dense_forward_s": timing["dense"]["forward_s"],
                "forward_s": timing["elastic"]["forward_s"],
                "decode_ratio": timing["elastic"]["decode_s"] / timing["dense"]["decode_s"],
            }
        )
    with torch.no_grad():
        set_budget(model, 0.3)
        first = model(ids).logits
        for budget in (0.1, 0.5, 0.2, 0.4):
            set_budget(model, budget)
            model(ids)
        set_budget(model, 0.3)
        identical = bool(torch.equal(model(ids).logits, first))
    return {"rows": rows, "switch_back_bit_identical": identical}


def _fmt(v, digits=4):
    return "-" if v is None else (f"{v:,.{digits}g}" if isinstance(v, float) else f"{v:,}")


def perplexity_at_budgets(cell: dict | None) -> dict[float, float]:
    """{budget: held-out perplexity} of a run's elastic evaluation (``eval.budgets``)."""
    return {round(b["requested_reduction"], 3): b["perplexity"] for b in (cell or {}).get("budgets") or []}


def budget_table(cells: dict, model: str, resizes: list[dict]) -> list[str]:
    """Elastic (switched), resized and fresh perplexity at each budget, resize time and checkpoint bytes."""
    elastic = cells.get(key_of("lowrank-elastic", model, "elastic"))
    if not elastic:
        return []

    budgets = {round(b["requested_reduction"], 3): b for b in elastic.get("budgets", [])}
    thinned, factors_only = (
        perplexity_at_budgets(cells.get(key_of("lowrank-elastic", model, tag)))
        for tag in ("elastic-thinned-curves", "elastic-factors-only")
    )
    resized = {r["budget"]: r for r in resizes}
    lines = [
        "| budget | elastic ppl | resized ppl | fresh ppl | elastic / fresh | before: 257-point curves | "
        "before: factors only | resize s (command s) | resized MB | `--fixed` MB | fresh MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in BUDGETS:
        e, r, f = budgets.get(b, {}), resized.get(b, {}), fresh_cell(cells, b, model) or {}
        ratio = e["perplexity"] / f["perplexity"] if e and f.get("perplexity") else None
        lines.append(
            f"| {b:.0%} | {_fmt(e.get('perplexity'))} | {_fmt(r.get('perplexity'))} | "
            f"{_fmt(f.get('perplexity'))} | {_fmt(ratio, 3)} | {_fmt(thinned.get(b))} | {_fmt(factors_only.get(b))} | "
            f"{r.get('resize_s', 0):.1f} ({r.get('command_s', 0):.1f}) | "
            f"{r.get('bytes', 0) / 1e6:.1f} | {r.get('fixed_bytes', 0) / 1e6:.1f} | "
            f"{f.get('bytes_after', 0) / 1e6:.1f} |"
        )
    return lines


def anchored_table(cells: dict, model: str, resizes: list[dict], heading: str = "##", note: str = "") -> list[str]:
    """The anchored fit at each budget against the single-stream elastic run and the fresh compressions."""
    anchored, elastic = (cells.get(key_of("lowrank-elastic", model, tag)) for tag in (ANCHORED[1], "elastic"))
    if not anchored or not elastic:
        return []

    single, both = perplexity_at_budgets(elastic), perplexity_at_budgets(anchored)
    resized = {r["budget"]: r for r in resizes}
    lines = [
        "",
        f"{heading} Anchored: the 50 % budget with factors of its own",
        "",
        "`stages.0.elastic.calibrate_on=[0.5]`, `stages.0.elastic.fit=anchored`: the run also calibrates on the "
        "50 % model's stream (the layers already compressed switched to 50 %, through the 50 % factors) and stores "
        "a second set of factors, fit on that stream, which serves 50 %; the budgets below it are served by the "
        "main factors, the same as the single-stream run's. `anchored` is the run switched to each budget, "
        "`resized` its `compress resize` scored with `compress eval`; x fresh in brackets.",
        "",
        "| budget | single stream | anchored | resized | fresh | resized MB |",
        "|---|---|---|---|---|---|",
    ]
    for b in BUDGETS:
        f = (fresh_cell(cells, b, model) or {}).get("perplexity")
        r = resized.get(b, {})
        cols = [
            f"{_fmt(v)} ({v / f:.2f})" if f and v else _fmt(v)
            for v in (single.get(b), both.get(b), r.get("perplexity"))
        ]
        lines.append(f"| {b:.0%} | " + " | ".join(cols) + f" | {_fmt(f)} | {r.get('bytes', 0) / 1e6:.1f} |")
    lines += [
        "",
        f"Checkpoint: {anchored['bytes_after'] / 1e6:.1f} MB anchored against {elastic['bytes_after'] / 1e6:.1f} MB "
        f"single-stream ({anchored['bytes_after'] / elastic['bytes_after'] - 1:+.1%}; "
        f"dense {elastic['bytes_before'] / 1e6:.1f} MB). Compression time: anchored "
        f"{anchored['compression_wall_s']:.0f} s, single-stream {elastic['compression_wall_s']:.0f} s "
        f"(dates {anchored['date']} / {elastic['date']}). {note}".rstrip(),
    ]
    return lines


def healing_table(cells: dict, model: str, heading: str = "##", note: str = "") -> list[str]:
    """One elastic healing run for 20-40 % (summed or sampled budgets) against healing each budget alone."""
    heal = [
        (label, cells.get(key_of("lowrank-elastic-healed", model, tag)))
        for label, tag in (
            ("elastic, summed loss (Starbucks)", "elastic-sum"),
            ("elastic, sampled budget (Maestro)", "elastic-sample"),
            ("before: summed loss, every budget's graph alive at once", "elastic-sum-one-backward"),
            ("before: factors only, summed loss", "elastic-sum-factors-only"),
        )
    ]
    separate = {b: cells.get(key_of("lowrank-20", model, f"fresh-{b:g}-healed")) for b in HEALED}
    if not any(c for _, c in heal) and not any(separate.values()):
        return []
    lines = [
        "",
        f"{heading} Healing 20-40 % at once",
        "",
        "96 steps x 2 windows x 512 tokens (one pass over 192 windows), AdamW lr 1e-4 cosine, every row. The "
        "elastic rows are one training run each for all three budgets; `separate` heals a fresh compression "
        "at each budget (three runs). Peak RSS: the whole `compress run` process (compression, training, "
        f"evaluation). {note}".rstrip(),
        "",
        "| healing | " + " | ".join(f"{b:.0%}" for b in HEALED) + " | training s | peak RSS GiB |",
        "|---|---|---|---|---|---|",
    ]
    for label, c in heal:
        if c:
            at = perplexity_at_budgets(c)
            lines.append(
                f"| {label} | "
                + " | ".join(_fmt(at.get(b)) for b in HEALED)
                + f" | {_fmt(_training_seconds(c), 4)} | {c['peak_rss_bytes'] / 2**30:.2f} |"
            )
    if any(separate.values()):
        done = [c for c in separate.values() if c]
        lines.append(
            "| separate (one run per budget) | "
            + " | ".join(_fmt(separate[b]["perplexity"]) if separate[b] else "pending" for b in HEALED)
            + f" | {_fmt(sum(_training_seconds(c) for c in done), 4)}{_runs_done(separate)}"
            + f" | {max(c['peak_rss_bytes'] for c in done) / 2**30:.2f} (the largest) |"
        )
    return lines


def _training_seconds(cell: dict) -> float:
    """The run's finetune stage's training wall time."""
    return next(stage["wall_time_s"] for stage in cell["stages"] if stage["method"] == "finetune")


def _runs_done(runs: dict) -> str:
    """' (k of n runs)' while some are pending, else ''."""
    done = sum(1 for run in runs.values() if run)
    return "" if done == len(runs) else f" ({done} of {len(runs)} runs)"


def switching_table(switching: dict | None, heading: str = "##") -> list[str]:
    """`set_budget` on one loaded model: forward and decode time at each budget against the dense model."""
    if not switching:
        return []
    lines = [
        "",
        f"{heading} Switching budgets in one process",
        "",
        "`compress.set_budget` on one loaded elastic model; forward pass over a 512-token window, median of "
        "5 runs interleaved with the dense model (CPU, fp32, 1 thread).",
        "",
        "| budget | forward s | dense forward s | forward ratio | 16-token decode ratio |",
        "|---|---|---|---|---|",
    ]
    for row in switching["rows"]:
        lines.append(
            f"| {row['budget']:.0%} | {row['forward_s']:.3f} | {row['dense_forward_s']:.3f} | "
            f"{row['forward_ratio']:.2f} | {row['decode_ratio']:.2f} |"
        )
    lines += [
        "",
        f"Switching 30 % -> 10 % -> 50 % -> 20 % -> 40 % -> 30 % gives bit-identical logits: "
        f"{switching['switch_back_bit_identical']}.",
    ]
    if switching.get("note"):
        lines += ["", switching["note"]]
    return lines


def render(data: dict) -> str:
    cells = load_cells(STORE)
    elastic = cells.get(key_of("lowrank-elastic", MODEL, "elastic"))
    lines = [
        "# Elastic rank",
        "",
        "## SmolLM2-135M",
        "",
        "Written by `python bench/elastic.py`; every number comes from `compress run` / `compress resize` / "
        "`compress eval` (bench/recipe_runs.md has the runs). Held-out Wikipedia, 32 windows of 512 tokens, "
        "one torch thread. `elastic` = one `recipes/lowrank-elastic.yaml` run (10-50 % range) switched to each "
        "budget; `resized` = that checkpoint cut with `compress resize` and scored with `compress eval`; "
        "`fresh` = `recipes/lowrank-20.yaml` run at that budget.",
        "",
    ]
    lines += budget_table(cells, MODEL, data.get("resize", []))
    if elastic and fresh_cell(cells, 0.2):
        single = fresh_cell(cells, 0.2)
        lines += [
            "",
            f"The elastic checkpoint stores {elastic['bytes_after'] / 1e6:.1f} MB against "
            f"{single['bytes_after'] / 1e6:.1f} MB for the single-budget 20 % checkpoint "
            f"({elastic['bytes_after'] / single['bytes_after'] - 1:+.1%}; the dense model: "
            f"{single['bytes_before'] / 1e6:.1f} MB): each matrix keeps its factors at the rank the 10 % budget "
            "gives it, and a matrix that budget keeps dense stores its dense weight beside factors at its "
            "largest rank that still saves parameters (a larger budget may factorise it). `resized` "
            "(`compress resize`) drops what no larger budget needs and still serves every larger reduction; "
            "`--fixed` writes that budget alone, as small as a fresh compression. `before: 257-point curves`: the "
            "same recipe when the checkpoint kept each loss curve at 257 log-spaced ranks and a resize interpolated "
            "between them (the starting budget then got other ranks than the compression's own). `before: factors "
            "only`: the first elastic design (every matrix stored as factors only, so every budget truncated every "
            "matrix), same recipe.",
        ]
    variants = [
        (label, cells.get(key_of("lowrank-elastic", MODEL, tag)))
        for label, tag in (
            ("start 20 %", "elastic-thinned-curves"),
            ("start 30 %", "elastic-start30"),
            ("start 20 %, pooled with 50 %", "elastic-pooled50"),
            ("start 20 %, nested with 50 %", "elastic-nested50"),
        )
    ]
    variants = [(label, cell) for label, cell in variants if cell]
    if len(variants) > 1:
        at = [perplexity_at_budgets(cell) for _, cell in variants]
        lines += [
            "",
            "## The calibration stream",
            "",
            "The calibration stream runs through the model at the stage's `reduction`, so every other budget's "
            "factors were fitted on inputs from a model compressed differently. Started at 30 % "
            "(`stages.0.reduction=0.3`), the error moves from the large budgets to the small ones. Pooled "
            "(`stages.0.elastic.calibrate_on=[0.5]`): each layer's statistics sum the 20 % stream's and the 50 % "
            "stream's (the model switched to 50 % in the layers already compressed), so the factors fit the "
            "inputs of both. Nested (`calibrate_on=[0.5]`, `fit=nested`): each matrix's leading ranks, those the "
            "50 % budget keeps, are fit on the 50 % stream alone, and its further ranks on the 20 % stream as the "
            "best extension of the leading ones, so the 50 % model is exactly the one an elastic run started at 50 % "
            "serves (tested) and the 20 % model differs from the single-stream one only by its leading ranks. "
            "Measured, nested serves 50 % within 4 % of fresh but costs 12-23 % at 10-30 %: the leading "
            "directions the 50 % stream needs are not those the 20 % stream needs, and ranks fit after them do "
            "not undo that. None of these streams is within 5 % of fresh at every budget; x fresh in brackets. "
            "Every column here was measured when checkpoints kept 257-point curves (the first table's `before`).",
            "",
            "| budget | " + " | ".join(label for label, _ in variants) + " | fresh |",
            "|---|" + "---|" * len(variants) + "---|",
        ]
        for b in BUDGETS:
            f = (fresh_cell(cells, b) or {}).get("perplexity")
            cols = [f"{_fmt(ppl.get(b))} ({ppl[b] / f:.2f})" if f and ppl.get(b) else _fmt(ppl.get(b)) for ppl in at]
            lines.append(f"| {b:.0%} | " + " | ".join(cols) + f" | {_fmt(f)} |")
        timed = [(label, cell.get("compression_wall_s")) for label, cell in variants if cell.get("compression_wall_s")]
        if timed:
            lines += ["", "Compression time: " + ", ".join(f"{label} {t:.0f} s" for label, t in timed) + "."]
    lines += anchored_table(cells, MODEL, data.get("anchored_resize", []), note=data.get("anchored_note", ""))
    lines += healing_table(
        cells,
        MODEL,
        note="The sampled-budget and `before` rows were measured when checkpoints kept 257-point curves; the summed "
        "row with the curves at every rank and each budget backpropagated on its own, on 2026-12-05 beside other "
        "jobs (the others on 2026-12-03): training seconds compare only within a day.",
    )
    lines += switching_table(data.get("switching"))
    for model, measured in data.get("models", {}).items():
        lines += ["", f"## {MODEL_NAMES.get(model, model)}", "", SECOND_MODEL_TEXT, ""]
        lines += budget_table(cells, model, measured.get("resize", []))
        elastic, single = cells.get(key_of("lowrank-elastic", model, "elastic")), fresh_cell(cells, 0.2, model)
        if elastic and single:
            lines += [
                "",
                f"Checkpoint bytes: elastic {elastic['bytes_after'] / 1e6:.1f} MB, single-budget 20 % "
                f"{single['bytes_after'] / 1e6:.1f} MB ({elastic['bytes_after'] / single['bytes_after'] - 1:+.1%}), "
                f"dense {single['bytes_before'] / 1e6:.1f} MB. Compression time: elastic "
                f"{elastic['compression_wall_s']:.0f} s, fresh 20 % {single['compression_wall_s']:.0f} s.",
            ]
        lines += anchored_table(
            cells, model, measured.get("anchored_resize", []), heading="###", note=measured.get("anchored_note", "")
        )
        lines += healing_table(cells, model, heading="###", note=measured.get("healing_note", ""))
        lines += switching_table(measured.get("switching"), heading="###")
    return "\n".join(lines) + "\n"


SECOND_MODEL_TEXT = (
    "The budget grid alone (`python bench/elastic.py --model MODEL`): the same recipes, overrides and protocol as "
    "SmolLM2-135M's first table; every budget's fresh compression is `recipes/lowrank-20.yaml` at that budget. "
    "These runs shared the machine with one other single-thread job on the other core, so their seconds are "
    "not comparable with SmolLM2's. The elastic checkpoint is larger than the dense model: a matrix the 10 % "
    "budget keeps dense stores its dense weight and its factors."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--model", default=MODEL, help=f"{MODEL}: the full grid; another model: the budget table")
    parser.add_argument(
        "--measure-only", action="store_true", help="no `compress run`: resize (and switch) the stored elastic run"
    )
    parser.add_argument(
        "--switching-only", action="store_true", help="no `compress run`, no resizes: time `set_budget` switching"
    )
    parser.add_argument("--healing", action="store_true", help="another model: the healing runs too (hours)")
    parser.add_argument(
        "--anchored-only", action="store_true", help="no `compress run`: resize the stored anchored run alone"
    )
    args = parser.parse_args()
    args.measure_only |= args.switching_only or args.anchored_only
    store = RESULTS / "elastic.json"
    data = json.loads(store.read_text()) if store.is_file() else {}
    if not args.render:
        healing = args.model == MODEL or args.healing
        cells = load_cells(STORE) if args.measure_only else ensure_runs(args.threads, args.model, healing)
        folder = ROOT / cells[key_of("lowrank-elastic", args.model, "elastic")]["folder"] / "model"
        anchored = cells.get(key_of(ANCHORED[0], args.model, ANCHORED[1]))
        measured = {}
        if not (args.switching_only or args.anchored_only):
            measured["resize"] = measure_resizes(folder, args.threads)
        if anchored and not args.switching_only:
            measured["anchored_resize"] = measure_resizes(ROOT / anchored["folder"] / "model", args.threads)
        if not args.anchored_only:
            measured["switching"] = measure_switching(folder, args.threads, args.model)
        # read the store again: another run of this script (another model) may have written to it meanwhile
        data = json.loads(store.read_text()) if store.is_file() else {}
        if args.model == MODEL:
            data.update(measured)
        else:
            data.setdefault("models", {}).setdefault(args.model, {}).update(measured)
        store.write_text(json.dumps(data, indent=2))
    (RESULTS / "elastic.md").write_text(render(data))


if __name__ == "__main__":
    main()
