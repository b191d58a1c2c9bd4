"""OFA embedding factorisation on Gemma-3-270M and SmolLM2-135M -> bench/results/ofa.md (+ .json).

Cells are ``MODEL:VARIANT:K``. VARIANT is ``dense`` (K = 0) or ``<weighting>-<head>`` with weighting
``svd`` (OFA's plain SVD) or ``freq`` (rows weighted by sqrt(token count + 1) on the calibration
windows) and head ``tied`` (logits (h P^T) C^T from the factors) or ``untied`` (the head keeps its
dense V x D matrix; only the input embedding is factorised). ``<variant>+train`` (or ``+train@LR``
for a learning rate other than --lr) cells factorise
afresh and then train only the two factors with the ``finetune`` method, measuring held-out
perplexity after each point of --curve-steps (the stage runs once per point with a constant lr, so
AdamW's state restarts at every point). Each cell runs in its own subprocess, one at a time, so
wall times and peak RSS are that cell's alone; results accumulate in ofa.json and a cell is
re-measured only with --force.

Protocol (README, "Measurement protocol"): perplexity is token-level exp(mean NLL) over the first --windows
non-overlapping 512-token windows of held-out Wikipedia (articles with index % 4 == 0), the dense
model measured by the same script; calibration windows (token counts, training) are --seq-len-token
windows of the calibration split. The logits-layer latency is the median of --latency-runs timed
calls (after 2 warm-up calls) of the LM head on --latency-tokens random hidden states, divided by
the median of the dense head (the source model's own V x D matrix) timed in the same process.

    python bench/ofa.py                                     # every pending cell, both models
    python bench/ofa.py --models smollm2-135m --ks 128
    python bench/ofa.py --cells smollm2-135m:freq-tied:128 smollm2-135m:freq-tied+train:128
    python bench/ofa.py --row smollm2-135m freq-tied 64 --windows 1 --curve-steps 1 2   # one cell, JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cells import forwarded_flags, load_cells, run_cells, save_cells
from curves import plot_curves

RESULTS = Path(__file__).parent / "results"
MODELS = ("gemma3-270m", "smollm2-135m")
KS = (64, 128, 256)
VARIANTS = {
    "svd-tied": "plain SVD (OFA), tied head served from the factors",
    "freq-tied": "frequency-weighted SVD, tied head served from the factors",
    "svd-untied": "plain SVD, the LM head keeps its own dense V x D matrix",
    "freq-untied": "frequency-weighted SVD, the LM head keeps its own dense V x D matrix",
    "top8k-tied": "the 8,192 most frequent calibration tokens keep full rows, the tail is frequency-weighted rank k, "
    "tied head (adaptive-input layout)",
    "top16k-tied": "the same with 16,384 full rows",
    "top32k-tied": "the same with 32,768 full rows",
    "freq-tied-logitfit": "freq-tied, but the rank-k fit minimises the tied head's logit error (`fit: logits`: the "
    "table whitened by the covariance of the final hidden states on 16 calibration windows)",
    "top16k-tied-logitfit": "top16k-tied with `fit: logits` for the tail",
    "top32k-tied-logitfit": "top32k-tied with `fit: logits` for the tail",
    "top48k-tied-logitfit": "the same with 49,152 full rows (beyond the tokens the calibration text counts, the "
    "lower token id wins: SentencePiece/BPE ids follow merge order, a frequency prior)",
    "top64k-tied-logitfit": "the same with 65,536 full rows",
    "top80k-tied-logitfit": "the same with 81,920 full rows",
    "top48k-tied-logitfit-fw128": "top48k-tied-logitfit with the hidden-state covariance from 128 calibration "
    "windows instead of 16",
    "top64k-tied-logitfit-fw128": "top64k-tied-logitfit, covariance from 128 windows",
    "top48k-tied-logitfit-fw512": "top48k-tied-logitfit, covariance from 512 windows",
    "top64k-tied-logitfit-fw512": "top64k-tied-logitfit, covariance from 512 windows",
}
TRAINED = ("svd-tied", "freq-tied")  # variants whose training curve is measured by default


def stage_for(variant: str, k: int) -> dict:
    """``<weighting>-<head>[-logitfit[-fwN]]``: fwN = the logit fit's covariance from N calibration windows."""
    weighting, head, *fit = variant.split("-")
    full = int(weighting[3:-1]) * 1024 if weighting.startswith("top") else 0
    stage = {
        "method": "ofa_embedding",
        "dim": k,
        "weighting": "none" if weighting == "svd" else "frequency",
        "keep_frequent": full,
        "untie": head == "untied",
        "fit": "logits" if fit[:1] == ["logitfit"] else "embedding",
    }
    if fit[1:2] and fit[1].startswith("fw"):
        stage["fit_windows"] = int(fit[1][2:])
    return stage


def _median_seconds(fn, runs: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def logits_latency(dense_weight, head, tokens: int, runs: int) -> dict:
    """Median seconds of the dense LM head (h E^T) and of ``head`` on the same random hidden states."""
    import torch

    hidden = torch.randn(tokens, dense_weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        dense = _median_seconds(lambda: torch.nn.functional.linear(hidden, dense_weight), runs)
        ours = _median_seconds(lambda: head(hidden), runs)
    return {"dense_head_s": dense, "head_s": ours, "latency_ratio": ours / dense}


def _size(model, tokenizer, row: dict) -> None:
    from compress.job import count_params, safetensors_bytes
    from compress.models import save_folder

    with tempfile.TemporaryDirectory() as tmp:
        save_folder(model, tokenizer, Path(tmp))
        row["bytes"] = safetensors_bytes(Path(tmp))
    row["params"] = count_params(model)


def run_cell(model_id: str, variant: str, k: int, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from compress.calibration import lazy_calibration_windows
    from compress.checkpoint import mark_compressed
    from compress.eval.corpora import load_documents
    from compress.eval.perplexity import perplexity
    from compress.eval.windows import token_windows
    from compress.methods.base import StageContext
    from compress.models import load_model
    from compress.pipeline import apply_stage
    from compress.recipe import parse_recipe
    from compress.utils import peak_rss_bytes

    torch.manual_seed(0)
    base, train, lr_text = variant.partition("+train")
    lr = float(lr_text.removeprefix("@")) if lr_text else args.lr
    loaded = load_model(model_id)
    model, tokenizer = loaded.model, loaded.tokenizer
    held = token_windows(tokenizer, load_documents("wikipedia", "heldout"), 512, args.windows)
    embedding = model.get_input_embeddings()
    vocab, width = embedding.weight.shape
    dense_weight = embedding.weight.detach().clone()
    row = {
        "model": model_id,
        "variant": variant,
        "k": k,
        "vocab": vocab,
        "width": width,
        "params_before": sum(p.numel() for p in model.parameters()),
        "threads": args.threads,
        "eval_windows": int(held.shape[0]),
        "eval_tokens": int(held.numel()),
    }

    def ppl() -> float:
        return perplexity(model, held, batch_size=args.eval_batch, progress=False)["perplexity"]

    if base == "dense":
        row["embedding_params"] = vocab * width
        row["perplexity"] = ppl()
        _size(model, tokenizer, row)
        row.update(logits_latency(dense_weight, model.get_output_embeddings(), args.latency_tokens, args.latency_runs))
        row["peak_rss_bytes"] = peak_rss_bytes()
        return row

    samples = max(args.samples, max(args.curve_steps) * args.batch_size) if train else args.samples
    recipe = parse_recipe(
        {
            "name": "bench",
            "stages": [stage_for(base, k)],
            "calibration": {"corpus": "wikipedia", "samples": samples, "seq_len": args.seq_len},
        }
    )
    windows = lazy_calibration_windows(tokenizer, recipe.calibration)

    ctx = StageContext(tokenizer, windows, progress=False)
    start = time.perf_counter()
    result = apply_stage(model, recipe.stages[0], ctx)
    row["factorise_wall_s"] = time.perf_counter() - start
    s = result.summary
    row.update({key: s[key] for key in ("dim", "achieved_reduction", "targeted_params_after", "rel_error", "head")})
    row["embedding_params"] = s["targeted_params_after"]
    for key in ("weighted_rel_error", "calibration_tokens", "tokens_seen", "keep_frequent", "full_row_token_share"):
        if key in s:
            row[key] = s[key]
    row["perplexity"] = ppl()
    if not train:
        mark_compressed(model, recipe.model_dump(mode="json"))
        _size(model, tokenizer, row)
        row.update(logits_latency(dense_weight, model.get_output_embeddings(), args.latency_tokens, args.latency_runs))
        row["peak_rss_bytes"] = peak_rss_bytes()
        return row

    curve, done, tokens, wall = [], 0, 0, 0.0
    for target in args.curve_steps:
        steps = target - done
        stage = {
            "method": "finetune",
            "targets": ["FactorizedEmbedding"],
            "steps": steps,
            "lr": lr,
            "schedule": "constant",
            "batch_size": args.batch_size,
            "eval_windows": 2,
            "seed": done,
        }
        ft = parse_recipe({"name": "bench", "stages": [stage]}).stages[0]
        summary = apply_stage(model, ft, ctx).summary
        done, tokens, wall = target, tokens + summary["tokens"], wall + summary["wall_time_s"]
        curve.append(
            {
                "steps": done,
                "tokens": tokens,
                "train_wall_s": wall,
                "perplexity": ppl(),
                "calibration_loss": summary["calibration_loss_after"],
            }
        )
        print(
            f"  {model_id}:{variant}:{k} {done} steps: ppl {curve[-1]['perplexity']:.4g}", file=sys.stderr, flush=True
        )
    row["curve"], row["lr"] = curve, lr
    row["trainable_params"] = summary["trainable_params"]
    row["peak_rss_bytes"] = peak_rss_bytes()
    return row


def _counted(c: dict) -> str:
    if "calibration_tokens" not in c:
        return "-"
    share = f" ({c['full_row_token_share']:.1%})" if c.get("full_row_token_share") else ""
    return f"{c['calibration_tokens']:,}{share}"


def render(cells: dict, args) -> str:
    from compress.report import md_table

    first = next(iter(cells.values()), None)
    threads = first["threads"] if first else args.threads
    lines = [
        "# OFA embedding factorisation (coordinates x primitives) on Gemma-3-270M and SmolLM2-135M",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on CPU ({threads} torch thread(s) per cell) by `python bench/ofa.py`. "
        "The input embedding E (V x D) becomes coordinates C (V x k) times primitives P (k x D) from a truncated SVD "
        "(`ofa_embedding`); `freq` weights row i by sqrt(count_i + 1) (token counts on the calibration windows) "
        "before the SVD and un-weights the coordinates after it. Perplexity: token-level exp(mean NLL) over the "
        "first N non-overlapping 512-token windows of held-out Wikipedia (articles with index % 4 == 0; windows "
        "do not start with a BOS token), the dense model measured by the same script. Embedding params: V*D "
        "dense, k(V+D) factorised, N D + k(V - N + D) with N full rows. Whole-model params count shared "
        "tensors once; an `untied` head adds its own "
        "V x D. Bytes: fp32 safetensors of the whole model. Logits latency: median LM-head time on "
        f"{args.latency_tokens} random hidden states / the dense head's median in the same process (CPU, "
        "shared machine: a ratio, not an absolute time). Rel. error: ||E - CP||_F / ||E||_F; weighted: the same "
        "with rows weighted by sqrt(count + 1).",
        "",
        "Variants: " + "; ".join(f"`{k}` = {v}" for k, v in VARIANTS.items()) + ".",
        "",
    ]
    for model_id in MODELS:
        rows = [c for c in cells.values() if c["model"] == model_id]
        if not rows:
            continue
        dense = cells.get(f"{model_id}:dense:0")
        dppl = dense["perplexity"] if dense else None
        table = []
        if dense:
            table.append(
                [
                    "dense",
                    "-",
                    f"{dense['embedding_params']:,}",
                    "0 %",
                    f"{dense['params']:,}",
                    "0 %",
                    f"{dense['bytes'] / 1e6:.1f}",
                    "-",
                    "-",
                    "-",
                    dense["perplexity"],
                    1.0,
                    1.0,
                    "-",
                ]
            )
        for c in sorted((c for c in rows if c["variant"] in VARIANTS), key=lambda c: (c["variant"], c["k"])):
            table.append(
                [
                    c["variant"],
                    c["k"],
                    f"{c['embedding_params']:,}",
                    f"{c['achieved_reduction']:.1%}",
                    f"{c['params']:,}",
                    f"{1 - c['params'] / dense['params']:.1%}" if dense else "-",
                    f"{c['bytes'] / 1e6:.1f}",
                    f"{c['rel_error']:.3f}",
                    f"{c['weighted_rel_error']:.3f}" if "weighted_rel_error" in c else "-",
                    _counted(c),
                    c["perplexity"],
                    c["perplexity"] / dppl if dppl else "-",
                    f"{c['latency_ratio']:.2f}",
                    f"{c['factorise_wall_s']:.1f}",
                ]
            )
        n = (dense or rows[0])["eval_windows"]
        lines += [
            f"## {model_id} (V = {rows[0]['vocab']:,}, D = {rows[0]['width']})",
            "",
            f"One-shot (no training), held-out perplexity over {n} x 512 tokens.",
            "",
            md_table(
                [
                    "variant",
                    "k",
                    "embedding params",
                    "embedding removed",
                    "whole-model params",
                    "whole model removed",
                    "MB on disk",
                    "rel. error",
                    "weighted rel. error",
                    "counted calibration tokens (share on full rows)",
                    "held-out ppl",
                    "ppl / dense",
                    "logits latency / dense",
                    "factorise wall s",
                ],
                table,
            ),
            "",
        ]
        trained = sorted((c for c in rows if "+train" in c["variant"]), key=lambda c: (c["variant"], c["k"]))
        if trained:
            curve_rows, curves = [], {}
            for c in trained:
                curves[f"{c['variant']} k={c['k']}"] = [(0, c["perplexity"])] + [
                    (p["tokens"], p["perplexity"]) for p in c["curve"]
                ]
                curve_rows.append(
                    [c["variant"], c["k"], 0, 0, "0", "-", c["perplexity"], c["perplexity"] / dppl if dppl else "-"]
                )
                for p in c["curve"]:
                    curve_rows.append(
                        [
                            c["variant"],
                            c["k"],
                            p["steps"],
                            f"{p['tokens']:,}",
                            f"{p['train_wall_s']:.0f}",
                            f"{p['calibration_loss']:.3f}",
                            p["perplexity"],
                            p["perplexity"] / dppl if dppl else "-",
                        ]
                    )
            figure = plot_curves(
                curves,
                RESULTS / f"{args.out}_{model_id}_curves.png",
                f"OFA on {model_id}: training the factorised embedding",
                dppl,
            )
            if figure:
                lines += [f"![perplexity against training tokens]({figure})", ""]
            lines += [
                "Training curve: only the factorised embedding trains (its full rows, coordinates and "
                "primitives: `finetune` with "
                f"`targets: [FactorizedEmbedding]`), AdamW at a constant lr (in the variant name after @, else "
                f"{args.lr:g}), batch {args.batch_size} x "
                f"{args.seq_len} calibration tokens; the stage is re-run for each point, so the optimiser "
                "state restarts there. Wall time is training only (perplexity excluded). Calibration loss: mean "
                "next-token loss on the first 2 calibration windows after that point (text the factors "
                "trained on); a falling calibration loss with a rising held-out perplexity is over-fitting.",
                "",
                md_table(
                    [
                        "variant",
                        "k",
                        "steps",
                        "tokens",
                        "train wall s",
                        "calibration loss",
                        "held-out ppl",
                        "ppl / dense",
                    ],
                    curve_rows,
                ),
                "",
            ]
    lines += outcome(cells)
    return "\n".join(lines)


def outcome(cells: dict, model_id: str = "gemma3-270m", cut: float = 0.40, aim: float = 1.3) -> list[str]:
    """The issue's aim on Gemma (whole model -40 % at ppl <= 1.3x dense): the best measured point that cuts enough."""
    dense = cells.get(f"{model_id}:dense:0")
    if dense is None:
        return []
    points = []  # (ppl, description) of every measured point, one-shot or along a training curve
    for c in cells.values():
        if c["model"] != model_id or c["variant"] == "dense" or "params" not in c and "+train" not in c["variant"]:
            continue
        base = cells.get(f"{model_id}:{c['variant'].partition('+train')[0]}:{c['k']}", c)
        if "params" not in base or 1 - base["params"] / dense["params"] < cut:
            continue
        removed = 1 - base["params"] / dense["params"]
        base_name = c["variant"].partition("+train")[0]
        points.append((c["perplexity"], f"`{base_name}` k={c['k']} one-shot ({removed:.1%} removed)"))
        for p in c.get("curve", []):
            points.append(
                (
                    p["perplexity"],
                    f"`{c['variant']}` k={c['k']} after {p['steps']} steps / "
                    f"{p['tokens']:,} tokens ({removed:.1%} removed)",
                )
            )
    if not points:
        return []
    best_ppl, best = min(points)
    ratio = best_ppl / dense["perplexity"]
    lines = [
        "## Outcome against the aim",
        "",
        f"Aim on {model_id}: whole-model parameters cut by >= {cut:.0%} at perplexity <= {aim}x dense "
        f"({aim * dense['perplexity']:.1f}). Best measured point that cuts enough: {best}, perplexity "
        f"{best_ppl:.4g} = {ratio:.2f}x dense: {'met' if ratio <= aim else 'missed'}.",
        "",
    ]
    ladder = [cells[key] for key in (f"{model_id}:{variant}:{k}" for variant, k in LADDER) if key in cells]
    if ladder:
        lines += ["What each step buys (one-shot, no training):", ""]
        lines += [
            f"- `{c['variant']}` k={c['k']} ({1 - c['params'] / dense['params']:.1%} removed): "
            f"{c['perplexity']:.4g} ({c['perplexity'] / dense['perplexity']:.2f}x)"
            for c in ladder
        ]
        lines.append("")
    return lines


# from plain OFA to the aim: one change per step
LADDER = (
    ("svd-tied", 128),
    ("freq-tied", 128),
    ("top32k-tied", 128),
    ("top32k-tied-logitfit", 128),
    ("top48k-tied-logitfit", 128),
    ("top48k-tied-logitfit-fw128", 128),
    ("top48k-tied-logitfit-fw512", 128),
    ("top64k-tied-logitfit-fw512", 64),
)


def plan_cells(args) -> list[str]:
    plan = []
    for model_id in args.models:
        plan.append(f"{model_id}:dense:0")
        plan += [f"{model_id}:{variant}:{k}" for k in args.ks for variant in args.variants]
        plan += [f"{model_id}:{variant}+train:{k}" for k in args.ks for variant in args.train_variants]
    return plan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--row", nargs=3, metavar=("MODEL", "VARIANT", "K"))
    parser.add_argument("--cells", nargs="*", help="MODEL:VARIANT:K cells to run (default: all pending)")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--ks", nargs="*", type=int, default=list(KS))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--train-variants", nargs="*", default=list(TRAINED))
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=1)
    parser.add_argument("--samples", type=int, default=256, help="calibration windows (token counts)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--curve-steps", nargs="*", type=int, default=[10, 20, 40, 80])
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--latency-tokens", type=int, default=128)
    parser.add_argument("--latency-runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="ofa", help="result file stem under bench/results")
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the json")
    args = parser.parse_args()
    if sorted(set(args.curve_steps)) != args.curve_steps or args.curve_steps[0] < 1:
        parser.error("--curve-steps must be increasing positive step counts")
    if args.row:
        print(json.dumps(run_cell(args.row[0], args.row[1], int(args.row[2]), args)))
        return
    store, markdown = RESULTS / f"{args.out}.json", RESULTS / f"{args.out}.md"
    cells = load_cells(store)

    def command(key):
        model_id, variant, k = key.split(":")
        return [
            sys.executable,
            __file__,
            "--row",
            model_id,
            variant,
            k,
            "--curve-steps",
            *map(str, args.curve_steps),
            *forwarded_flags(
                args,
                (
                    "windows",
                    "eval_batch",
                    "samples",
                    "seq_len",
                    "lr",
                    "batch_size",
                    "latency_tokens",
                    "latency_runs",
                    "threads",
                ),
            ),
        ]

    def describe(cell):
        curve = cell.get("curve")
        return f"ppl {cell['perplexity']:.4g}" + (f" -> trained {curve[-1]['perplexity']:.4g}" if curve else "")

    def save(cells):
        save_cells(cells, store, markdown, lambda c: render(c, args))

    if not args.render:
        run_cells(
            args.cells or plan_cells(args), cells, command, save, describe, lambda key: key in cells and not args.force
        )
    save(cells)


if __name__ == "__main__":
    main()
