"""FactorLLM on SmolLM2-135M: FFNs split into experts, routed top-k -> bench/results/factorllm.md (+ .json).

Cells (each in its own subprocess, one at a time, so wall time and peak RSS are that cell's alone;
results accumulate in the json, a cell is re-measured only with --force):

* ``dense``: the dense model's held-out perplexity.
* ``<layout>/<partition>/split``: every FFN split (weights unchanged) and its router fitted layer by
  layer (least squares + PA-loss epochs on calibration activations). Measures FFN FLOPs per token,
  perplexity with the fitted routers, with untrained (random) routers and with oracle routing (the
  PA labels themselves: the bound a router can reach), router/label agreement on held-out text, the
  CPU latency ratio of a 512-token forward (and greedy decoding) against the dense model, wall time.
  Saves the split checkpoint for the training cells.
* ``<layout>/<partition>/router`` and ``.../experts``: load that checkpoint and train the routers
  (``train: router``) or routers + experts (``train: router+experts``) end to end with accelerate;
  perplexity after every quarter of the steps (a curve of ppl vs training tokens).

Protocol (README, "Measurement protocol"): perplexity is token-level exp(mean NLL) over the first --windows
non-overlapping 512-token windows of held-out Wikipedia (articles with index % 4 == 0); calibration and
training windows (--seq-len tokens) come from the calibration split. Speed is a ratio to the dense model
measured in the same process (median of --latency-repeats runs after a warm-up, interleaved).

    python bench/factorllm.py                                   # every pending cell
    python bench/factorllm.py --cells dense 4e2k/cluster/split 4e2k/cluster/experts
    python bench/factorllm.py --layouts 4e2k --partitions cluster
    python bench/factorllm.py --cell 4e2k/cluster/split --windows 1 --fit-windows 2 --seq-len 64   # one cell, JSON
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from cells import forwarded_flags, load_cells, run_cells, save_cells
from curves import plot_curves

from compress.modules.moe_ffn import COMBINES
from compress.report import md_table

RESULTS = Path(__file__).parent / "results"
LAYOUTS = {  # name: (routed experts, top_k, shared experts)
    "4e2k": (4, 2, 0),
    "8e2k": (8, 2, 0),
    "1s3e1k": (3, 1, 1),  # one always-on expert + top-1 of 3 routed: half the FFN per token, like 4e2k
}
PARTITIONS = ("contiguous", "random", "cluster")
PHASES = ("split", "router", "experts")
TRAIN_MODE = {"router": "router", "experts": "router+experts"}
LONG_PHASE = "experts-long"  # router + experts for --long-steps at --long-lr: the longest point of the curve


def stage_for(layout: str, partition: str, args, train: str = "none") -> dict:
    experts, top_k, shared = LAYOUTS[layout]
    stage = {
        "method": "factorllm",
        "targets": [r"re:.*\.mlp$"],
        "experts": experts,
        "top_k": top_k,
        "shared_experts": shared,
        "partition": partition,
        "combine": args.combine,
        "labels": args.labels,
        "router_fit": "least_squares",
        "router_fit_windows": args.fit_windows,
        "router_fit_epochs": args.fit_epochs,
        "cluster_tokens": 4096,
    }
    if train != "none":
        stage.update(
            trainable=train,
            router_lr=args.router_lr,
            train={
                "steps": args.steps,
                "lr": args.lr,
                "schedule": "cosine",
                "eval_windows": 4,
                "warmup_steps": min(args.warmup, args.steps - 1),
                "batch_size": args.batch_size,
            },
        )
    return stage


def _checkpoint(args, layout: str, partition: str) -> Path:
    from compress.eval.cache import compress_cache_dir

    return compress_cache_dir() / "bench" / args.name / f"{layout}-{partition}"


def _ppl(model, held) -> float:
    from compress.eval.perplexity import perplexity

    return perplexity(model, held, batch_size=4, progress=False)["perplexity"]


def _held(tokenizer, args):
    from compress.eval.corpora import load_documents
    from compress.eval.windows import token_windows

    return token_windows(tokenizer, load_documents("wikipedia", "heldout"), 512, args.windows)


def _calibration(tokenizer, args, samples: int):
    from compress.calibration import calibration_windows
    from compress.recipe import CalibrationConfig

    return calibration_windows(tokenizer, CalibrationConfig(corpus="wikipedia", samples=samples, seq_len=args.seq_len))


def _agreement(model, held, args) -> dict:
    from compress.methods.factorllm import measure_agreement

    out = {}
    for rule in ("pa", "best_subset"):
        a = measure_agreement(model, held[: args.agree_windows], label_rule=rule)
        out[rule] = {"agreement": a["agreement"], "exact": a["exact"], "chance": a["chance"]}
    return out


def run_dense(args) -> dict:
    from compress.job import count_params
    from compress.models import load_model
    from compress.utils import peak_rss_bytes

    loaded = load_model(args.model)
    held = _held(loaded.tokenizer, args)
    return {
        "cell": "dense",
        "perplexity": _ppl(loaded.model, held),
        "params": count_params(loaded.model),
        "eval_windows": int(held.shape[0]),
        "threads": args.threads,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def run_split(layout: str, partition: str, args) -> dict:
    import torch
    from latency import compare_latency

    from compress.checkpoint import mark_compressed
    from compress.job import count_params
    from compress.methods.base import StageContext
    from compress.methods.factorllm import model_ffn_flops, pa_wrapped
    from compress.methods.factorllm.train import moe_names
    from compress.models import load_model, save_folder
    from compress.pipeline import apply_stage
    from compress.recipe import parse_recipe
    from compress.utils import peak_rss_bytes

    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    held = _held(tokenizer, args)
    recipe = parse_recipe(
        {
            "name": "bench",
            "stages": [stage_for(layout, partition, args)],
            "calibration": {"corpus": "wikipedia", "samples": args.fit_windows, "seq_len": args.seq_len},
        }
    )
    calib = _calibration(tokenizer, args, args.fit_windows)
    start = time.perf_counter()
    result = apply_stage(model, recipe.stages[0], StageContext(tokenizer, lambda: calib, progress=False))
    row = {
        "cell": f"{layout}/{partition}/split",
        "split_wall_s": time.perf_counter() - start,
        "eval_windows": int(held.shape[0]),
        "threads": args.threads,
        "params": count_params(model),
        **model_ffn_flops(model),
        "router_fit_agreement": result.summary.get("router_fit_agreement"),
        "label_load_max": max(r.get("label_load_max", 0.0) for r in result.rows),
    }
    row["ppl_fitted"] = _ppl(model, held)
    row["agreement"] = _agreement(model, held, args)
    names = moe_names(model)
    for rule in ("pa", "best_subset"):  # routing by the labels themselves: what a perfect router would give
        with pa_wrapped(model, names, rule, route_by="labels"):
            row[f"ppl_oracle_{rule}"] = _ppl(model, held)
    fitted = {name: {k: v.clone() for k, v in model.get_submodule(name).router.state_dict().items()} for name in names}
    torch.manual_seed(0)
    for name in names:  # untrained: nn.Linear's default random init
        model.get_submodule(name).router.reset_parameters()
    row["ppl_untrained"] = _ppl(model, held)
    for name in names:
        model.get_submodule(name).router.load_state_dict(fitted[name])
    ids = held[:1, :512]
    dense = load_model(args.model).model
    timing = compare_latency({"dense": dense, "moe": model}, ids, new_tokens=32, repeats=args.latency_repeats)
    row["latency"] = timing
    row["forward_ratio"] = timing["moe"]["forward_s"] / timing["dense"]["forward_s"]
    row["decode_ratio"] = timing["moe"]["decode_s"] / timing["dense"]["decode_s"]
    del dense
    mark_compressed(model, recipe.model_dump(mode="json"))
    save_folder(model, tokenizer, _checkpoint(args, layout, partition))
    row["peak_rss_bytes"] = peak_rss_bytes()
    return row


def run_train(layout: str, partition: str, phase: str, args) -> dict:
    from compress.methods.factorllm import train_moe
    from compress.models import load_folder
    from compress.recipe import parse_recipe
    from compress.utils import peak_rss_bytes

    folder = _checkpoint(args, layout, partition)
    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing: run the cell {layout}/{partition}/split first")
    model, tokenizer, _ = load_folder(folder)
    held = _held(tokenizer, args)
    if phase == LONG_PHASE:
        args.steps, args.lr = args.long_steps, args.long_lr
    stage = stage_for(layout, partition, args, TRAIN_MODE[phase.removesuffix("-long")])
    config = parse_recipe({"name": "bench", "stages": [stage]}).stages[0]
    windows = _calibration(tokenizer, args, max(args.fit_windows, args.steps * args.batch_size))
    points = sorted({max(1, round(args.steps * (i + 1) / args.curve_points)) for i in range(args.curve_points)})
    curve = []

    def measure(step, tokens):
        if step in points:
            curve.append({"step": step, "tokens": tokens, "perplexity": _ppl(model, held)})

    trained = train_moe(model, config, windows, progress=False, callback=measure)
    s = trained["summary"]
    return {
        "cell": f"{layout}/{partition}/{phase}",
        "train": config.trainable,
        "curve": curve,
        "warmup": config.train.warmup_steps,
        "perplexity": curve[-1]["perplexity"],
        "train_wall_s": s["wall_time_s"],
        "steps": s["steps"],
        "tokens": s["tokens"],
        "lr": s["lr"],
        "router_lr": s["router_lr"],
        "trainable_params": s["trainable_params"],
        "calibration_loss_before": s["calibration_loss_before"],
        "calibration_loss_after": s["calibration_loss_after"],
        "agreement": _agreement(model, held, args),
        "eval_windows": int(held.shape[0]),
        "threads": args.threads,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def run_cell(key: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if key == "dense":
        return run_dense(args)
    layout, partition, phase = key.split("/")
    if layout not in LAYOUTS or partition not in PARTITIONS or phase not in (*PHASES, LONG_PHASE):
        raise SystemExit(f"unknown cell {key!r}")
    if phase == "split":
        return run_split(layout, partition, args)
    return run_train(layout, partition, phase, args)


def _agree(c: dict | None, layout: str, rule: str = "pa") -> str:
    """Overlap / exact-set agreement, each with its chance level: k/E and 1/C(E, k)."""
    if not c or "agreement" not in c:
        return "-"
    a = c["agreement"][rule]
    experts, top_k, _ = LAYOUTS[layout]
    return f"{a['agreement']:.3f} / {a['exact']:.3f} (chance {a['chance']:.2f} / {1 / math.comb(experts, top_k):.3f})"


def render(cells: dict, args) -> str:

    dense = cells.get("dense")
    dppl = dense["perplexity"] if dense else None

    def rel(ppl):
        return f"{ppl:.4g} ({ppl / dppl:.2f}x)" if dppl else f"{ppl:.4g}"

    split_rows, train_rows, curves = [], [], {}
    for layout in LAYOUTS:
        for partition in PARTITIONS:
            c = cells.get(f"{layout}/{partition}/split")
            if c is None:
                split_rows.append([layout, partition] + ["pending"] * 10)
            else:
                split_rows.append(
                    [
                        layout,
                        partition,
                        f"{c['ffn_flops_per_token'] / 1e6:.1f}M ({c['ffn_flops_ratio']:.3f})",
                        rel(c["ppl_untrained"]),
                        rel(c["ppl_oracle_pa"]),
                        rel(c["ppl_oracle_best_subset"]),
                        rel(c["ppl_fitted"]),
                        _agree(c, layout),
                        _agree(c, layout, "best_subset"),
                        f"{c['forward_ratio']:.3f}",
                        f"{c['decode_ratio']:.3f}",
                        f"{c['split_wall_s']:.0f}",
                    ]
                )
            for phase in ("router", "experts", LONG_PHASE):
                t = cells.get(f"{layout}/{partition}/{phase}")
                if t is None:
                    continue
                points = ([{"tokens": 0, "perplexity": c["ppl_fitted"]}] if c else []) + t["curve"]
                curve = ", ".join(f"{p['tokens']:,}: {p['perplexity']:.4g}" for p in points)
                curves[f"{layout}/{partition}: {t['train']}, {t['steps']} steps, lr {t['lr']:g}"] = [
                    (p["tokens"], p["perplexity"]) for p in points
                ]
                train_rows.append(
                    [
                        layout,
                        partition,
                        f"{t['train']} ({t['steps']} steps, lr {t['lr']:g})",
                        curve,
                        rel(t["perplexity"]),
                        _agree(t, layout),
                        f"{t['calibration_loss_before']:.3f} -> {t['calibration_loss_after']:.3f}",
                        f"{t['train_wall_s']:.0f}",
                    ]
                )
    threads = next(iter(cells.values()))["threads"] if cells else args.threads
    windows = dense["eval_windows"] if dense else args.windows
    lines = [
        "# FactorLLM on SmolLM2-135M: FFNs split into routed experts",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} by `python bench/factorllm.py` on a shared CPU ({threads} torch "
        "thread(s) per cell; wall times are only roughly comparable). Every one of the 30 FFNs (hidden 576, "
        "intermediate 1536) is split into equal experts that reuse its weights (nothing removed: the saving is "
        "compute, not parameters); a linear router (with bias) picks the top-k routed experts per token, "
        f"combined as `{args.combine}`. Perplexity: token-level exp(mean NLL) over the first {windows} "
        "non-overlapping 512-token windows of held-out Wikipedia (articles with index % 4 == 0), the dense "
        "model measured by the same script" + (f" (ppl {dppl:.2f})." if dppl else "."),
        "",
        "Layouts: `4e2k` = 4 experts, top-2; `8e2k` = 8 experts, top-2; `1s3e1k` = 1 always-on shared expert "
        "+ top-1 of 3 routed (half the FFN per token, like 4e2k; the shared expert takes the neurons of highest "
        "mean |activation|). Partitions: `contiguous` neuron blocks, `random`, `cluster` = balanced k-means on "
        "the neurons' |activation| patterns over 4,096 calibration tokens (MoEfication).",
        "",
        "## Split, router fitted layer by layer",
        "",
        md_table(
            [
                "layout",
                "partition",
                "FFN FLOPs/token (vs dense)",
                "ppl, untrained router",
                "ppl, oracle PA labels",
                "ppl, oracle best-subset labels",
                "ppl, fitted router",
                "agreement with PA labels (overlap / exact)",
                "agreement with best-subset labels",
                "CPU forward 512 tok (vs dense)",
                "CPU greedy decode (vs dense)",
                "split wall s",
            ],
            split_rows,
        ),
        "",
        f"FFN FLOPs/token: matmul FLOPs of all 30 FFNs incl. the routers (2 per multiply-add). Router fit: ridge "
        f"regression onto the {args.labels} pseudo-labels of {args.fit_windows} calibration windows of "
        f"{args.seq_len} tokens, then {args.fit_epochs} epochs of the PA route loss (KL to the labels) + load "
        "balance, each layer on the outputs of the already-split layers before it. Untrained router: nn.Linear's "
        "random init. Oracle: routing by the pseudo-labels themselves (computed from all experts and the dense FFN "
        "output; PA = the k experts with the lowest MSE(E_i(x), T k/E), best-subset = the k-subset whose combined "
        "output is closest to T), the bound a router trained on those labels can reach. "
        f"Agreement: on the first {args.agree_windows} held-out windows, "
        "mean overlap of the router's top-k with the label set / fraction of identical sets. Latency: median of "
        f"{args.latency_repeats} interleaved runs after a warm-up (forward of one 512-token window; 32 greedy "
        "decoding steps after a 16-token prompt), dense and split model in the same process.",
        "",
    ]
    if train_rows:
        figure = plot_curves(
            curves, RESULTS / f"{args.name}_curves.png", "FactorLLM on SmolLM2-135M: training buys back", dppl
        )
        lines += [
            "## End-to-end training (from the split checkpoint)",
            "",
            *([f"![perplexity against training tokens]({figure})", ""] if figure else []),
            md_table(
                [
                    "layout",
                    "partition",
                    "train",
                    "ppl after N training tokens",
                    "final ppl",
                    "agreement with PA labels",
                    "calibration loss",
                    "train wall s",
                ],
                train_rows,
            ),
            "",
            f"AdamW (cosine schedule, {min(args.warmup, args.steps - 1)} warm-up steps, "
            f"batch {args.batch_size} x "
            f"{args.seq_len} tokens of calibration Wikipedia; expert lr as in the train column, {args.router_lr:g} for "
            "routers); attention, norms and embeddings frozen. Loss = next-token CE + mean over layers of the "
            "relative MSE of the MoE FFN output against the frozen dense FFN + KL(router || PA labels) + 0.01 load "
            "balance. With `combine: sum` the CE and MSE terms reach only the experts (hard top-k passes no gradient "
            "to the router), so `train: router` is driven by the PA route loss alone. Train wall time excludes the "
            "perplexity measurements of the curve.",
            "",
        ]
    lines += combine_section(cells, args, rel)
    lines += outcome(cells, dppl)
    return "\n".join(lines)


COMBINE_CELL = "4e2k/cluster"  # the layout/partition the combine rules are compared on


def combine_section(cells: dict, args, rel) -> list[str]:
    """The combine rules side by side on COMBINE_CELL: this run's cells plus the runs stored under
    ``<name>-<combine>`` (``--name factorllm-scale --combine scale``, ...)."""
    runs = {args.combine: cells}
    for combine in COMBINES:
        store = RESULTS / f"{args.name}-{combine}.json"
        if combine != args.combine and store.is_file():
            runs[combine] = load_cells(store)
    if len(runs) < 2:
        return []
    rows = []
    for combine, run in runs.items():
        split, trained = run.get(f"{COMBINE_CELL}/split"), run.get(f"{COMBINE_CELL}/experts")
        rows.append(
            [
                f"`{combine}`",
                rel(split["ppl_untrained"]) if split else "pending",
                rel(split["ppl_fitted"]) if split else "pending",
                ", ".join(f"{p['tokens']:,}: {p['perplexity']:.4g}" for p in trained["curve"])
                if trained
                else "pending",
                rel(trained["perplexity"]) if trained else "pending",
                _agree(trained, "4e2k") if trained else "-",
            ]
        )
    return [
        "## Combine rule",
        "",
        f"{COMBINE_CELL}, the same split, router fit and router+experts training ({args.steps} steps) with each "
        "combine rule: `sum` = plain partial sum of the dense FFN; `scale` = times E/k (FactorLLM); `weights` = "
        "k * softmax over the chosen router logits (the only rule that passes the CE gradient to the router). "
        "Results of the other rules: `python bench/factorllm.py --name factorllm-<rule> --combine <rule> --cells "
        f"{COMBINE_CELL}/split {COMBINE_CELL}/experts`.",
        "",
        md_table(
            [
                "combine",
                "ppl, untrained router",
                "ppl, fitted router",
                "ppl after N training tokens",
                "final ppl",
                "agreement with PA labels",
            ],
            rows,
        ),
        "",
    ]


def outcome(cells: dict, dppl: float | None) -> list[str]:
    """The issue's aim (FFN FLOPs halved, ppl <= 1.5x dense, forward latency < 0.85), computed from the cells."""
    trained = [(key, c) for key, c in cells.items() if key.count("/") == 2 and not key.endswith("/split")]
    if not dppl or not trained:
        return []
    lines = [
        "## Outcome against the aim",
        "",
        "Aim: FFN FLOPs halved at perplexity <= 1.5x dense and a 512-token forward latency ratio < 0.85.",
        "",
    ]
    for key, t in sorted(trained, key=lambda kc: kc[1]["perplexity"]):
        split = cells.get(key.rsplit("/", 1)[0] + "/split")
        if split is None:
            continue
        ratio = t["perplexity"] / dppl
        lines.append(
            f"- `{key}` ({t['tokens']:,} training tokens, {t['train_wall_s'] / 60:.0f} min): FFN FLOPs "
            f"x{split['ffn_flops_ratio']:.3f}, perplexity {t['perplexity']:.4g} = {ratio:.2f}x dense "
            f"({'met' if ratio <= 1.5 else 'missed'}), forward latency x{split['forward_ratio']:.2f} "
            f"({'met' if split['forward_ratio'] < 0.85 else 'missed'}); routing by the best-subset labels of the "
            f"same split (no training) gives {split['ppl_oracle_best_subset']:.4g}."
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cell", help="run one cell in this process and print its JSON")
    parser.add_argument("--cells", nargs="*", help="cells to run (default: all pending)")
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--partitions", nargs="*", default=list(PARTITIONS), choices=list(PARTITIONS))
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the json")
    parser.add_argument("--name", default="factorllm", help="results file stem (and checkpoint folder)")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--fit-windows", type=int, default=32)
    parser.add_argument("--fit-epochs", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--combine", default="sum", choices=COMBINES)
    parser.add_argument("--labels", default="pa", choices=["pa", "best_subset"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--curve-points", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--router-lr", type=float, default=1e-3)
    parser.add_argument("--long-steps", type=int, default=300, help=f"steps of the {LONG_PHASE} cells")
    parser.add_argument("--long-lr", type=float, default=2e-4, help=f"expert lr of the {LONG_PHASE} cells")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--agree-windows", type=int, default=4)
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(args.cell, args)))
        return
    store, markdown = RESULTS / f"{args.name}.json", RESULTS / f"{args.name}.md"
    cells = load_cells(store)
    plan = ["dense"] + [
        f"{layout}/{partition}/{phase}" for layout in args.layouts for partition in args.partitions for phase in PHASES
    ]

    def command(key):
        return [
            sys.executable,
            __file__,
            "--cell",
            key,
            *forwarded_flags(
                args,
                (
                    "name",
                    "windows",
                    "fit_windows",
                    "fit_epochs",
                    "seq_len",
                    "combine",
                    "labels",
                    "steps",
                    "curve_points",
                    "lr",
                    "router_lr",
                    "long_steps",
                    "long_lr",
                    "warmup",
                    "batch_size",
                    "agree_windows",
                    "latency_repeats",
                    "threads",
                    "model",
                ),
            ),
        ]

    def save(cells):
        save_cells(cells, store, markdown, lambda c: render(c, args))

    if not args.render:
        run_cells(
            args.cells or plan,
            cells,
            command,
            save,
            lambda c: f"ppl {c.get('ppl_fitted', c.get('perplexity')):.4g}",
            lambda key: key in cells and not args.force,
        )
    save(cells)


if __name__ == "__main__":
    main()
