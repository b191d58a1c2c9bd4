"""report.json + report.md (tables) + plots for one run."""

from __future__ import annotations

import json
import math
from pathlib import Path


def protocol(report: dict) -> str:
    """How the report's numbers were measured (report.md and the model card), naming the held-out corpus."""
    perplexity = (report.get("eval_compressed") or {}).get("perplexity") or {}
    corpus = perplexity.get("corpus", "wikipedia")
    return (
        "Protocol (README, 'Measurement protocol'): compression ratio = fraction of the targeted modules' "
        "parameters removed; perplexity = token-level exp(mean NLL) over non-overlapping windows of the "
        f"held-out split of the bundled {corpus} corpus (documents with index % 4 == 0), dense baseline "
        "measured in the same run with the same settings; lm-eval's *_ppl tasks report word perplexity "
        "(labelled as such)."
    )


def evaluation_section(report: dict) -> list[str]:
    """The dense-against-compressed table (report.md and the model card)."""
    return [
        "## Evaluation",
        "",
        md_table(
            ["metric", "dense", "compressed", "compressed / dense"],
            eval_rows(report.get("eval_dense"), report["eval_compressed"]),
        ),
        "",
    ]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:.3e}"
    return str(value)


def cell(value) -> str:
    """A markdown table cell: numbers formatted as above, lists joined, pipes escaped, one line."""
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value) if value else "-"
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def md_table(headers: list[str], rows: list[list]) -> str:
    """A markdown table (report.md, the model card, the bench results)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def flatten_eval(evaluation: dict) -> dict[str, float]:
    """{"wikipedia token perplexity": x, "wikipedia_ppl word_perplexity": y, ...}."""
    flat = {}
    for ppl in (evaluation.get("perplexity_by_corpus") or {"": evaluation.get("perplexity")}).values():
        if ppl:
            flat[
                f"{ppl.get('corpus', 'wikipedia')} held-out token perplexity ({ppl['windows']} x "
                f"{ppl.get('seq_len', 512)} tokens)"
            ] = ppl["perplexity"]
    for task, metrics in evaluation.get("lm_eval", {}).items():
        for metric, value in metrics.items():
            if not metric.endswith("_stderr"):
                flat[f"{task} {metric} (lm-eval)"] = value
    return flat


def eval_rows(dense: dict | None, compressed: dict) -> list[list]:
    compressed_flat, dense_flat = flatten_eval(compressed), flatten_eval(dense or {})
    rows = []
    for key, value in compressed_flat.items():
        base = dense_flat.get(key)
        ratio = value / base if base not in (None, 0) else None
        rows.append([key, base, value, ratio])
    return rows


def size_rows(size: dict) -> list[list]:
    """Parameters and bytes before and after (an elastic checkpoint also stores more than its budget uses)."""
    rows = [
        ["parameters (whole model)", size["params_before"], size["params_after"]],
        ["parameters (targeted modules)", size["targeted_params_before"], size["targeted_params_after"]],
    ]
    if size.get("targeted_params_stored") not in (None, size["targeted_params_after"]):
        rows.append(
            [
                "parameters (targeted modules, stored for every budget)",
                size["targeted_params_before"],
                size["targeted_params_stored"],
            ]
        )
    rows.append(["bytes on disk (safetensors)", size["bytes_before"], size["bytes_after"]])
    return [[label, before, after, after / max(before, 1)] for label, before, after in rows]


def render_markdown(report: dict) -> str:
    size = report["size"]
    out = [
        f"# {report['recipe']['name']}: {report['source']['id']}",
        "",
        f"Base model: `{report['source'].get('base_model', '')}` ({report['source']['kind']}). "
        f"Created {report['created']} with compress {report['versions']['compress']}.",
        "",
        "## Size",
        "",
        md_table(["", "dense", "compressed", "compressed / dense"], size_rows(size)),
        "",
        f"Compression ratio (targeted parameters removed): **{size['compression_ratio']:.1%}**.",
        "",
    ]
    calibration = report.get("calibration")
    if calibration:
        out += [
            "## Calibration data",
            "",
            md_table(
                ["source", "weight", "windows"],
                [[c["source"], c.get("weight", 1.0), c["windows"]] for c in calibration["sources"]],
            ),
            "",
            f"{calibration['samples']} windows of {calibration['seq_len']} tokens.",
            "",
        ]
    out += [*evaluation_section(report), protocol(report), ""]
    budgets = (report.get("eval_compressed") or {}).get("budgets")
    if budgets:
        dense = ((report.get("eval_dense") or {}).get("perplexity") or {}).get("perplexity")
        out += [
            "## Budgets this elastic checkpoint serves",
            "",
            "`compress.set_budget(model, r)` switches in place; `compress resize RUN --reduction r` writes a "
            "smaller checkpoint that still serves the larger reductions (with `--fixed`: that budget only, as "
            "small as a single-budget compression). Held-out token perplexity at each budget (same windows):",
            "",
            md_table(
                ["requested reduction", "achieved reduction", "perplexity", "x dense"],
                [
                    [
                        b["requested_reduction"],
                        b["reduction"],
                        b["perplexity"],
                        b["perplexity"] / dense if dense else None,
                    ]
                    for b in budgets
                ],
            ),
            "",
        ]
    for i, stage in enumerate(report["stages"]):
        out += [
            f"## Stage {i}: {stage['method']}",
            "",
            md_table(["", "value"], [[k, v] for k, v in stage["summary"].items()]),
            "",
        ]
        if stage["rows"]:
            headers = list(dict.fromkeys(key for row in stage["rows"] for key in row))  # rows differ by kind
            out += [md_table(headers, [[row.get(h) for h in headers] for row in stage["rows"]]), ""]
    out += [f"![{name}]({name})" for name in report.get("figures", [])]
    return "\n".join(out) + "\n"


RANK_COLORS = {"low-rank": "tab:blue", "grouped low-rank": "tab:orange", "dense": "tab:gray"}


def kept_rank(row: dict) -> tuple[float, str]:
    """(rank kept / full rank, storage kind) of one row of a low-rank stage.

    A matrix left dense (rank None, or WeLore's N-LRC) keeps its full rank; a grouped k/v factorisation
    (``groups`` latents of ``rank`` each) keeps groups x rank latent dimensions.
    """
    if row.get("rank") is None or row.get("kind") in ("dense", "N-LRC"):
        return 1.0, "dense"
    groups = row.get("groups") or 1
    kind = "grouped low-rank" if groups > 1 else "low-rank"
    return min(row["rank"] * groups / row["full_rank"], 1.0), kind


def plot_figures(report: dict, series: list[dict], folder: Path) -> list[str]:
    """Rank kept per matrix and normalised spectra (low-rank stages); loss curves (training stages)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for i, (stage, extra) in enumerate(zip(report["stages"], series)):
        rows = [r for r in stage["rows"] if "full_rank" in r]
        if rows:
            kept = [kept_rank(r) for r in rows]
            fig, ax = plt.subplots(figsize=(12, 4))
            ax.bar(
                range(len(rows)),
                [fraction for fraction, _ in kept],
                width=1.0,
                color=[RANK_COLORS[kind] for _, kind in kept],
            )
            ax.set(
                xlabel="targeted matrix (model order)",
                ylabel="rank kept / full rank",
                ylim=(0, 1.05),
                title=f"stage {i} ({stage['method']}): rank kept per matrix",
            )
            ax.legend(
                handles=[
                    plt.Rectangle((0, 0), 1, 1, color=RANK_COLORS[kind], label=kind)
                    for kind in dict.fromkeys(kind for _, kind in kept)
                ],
                fontsize=8,
            )
            name = f"ranks_stage{i}.png"
            fig.tight_layout(), fig.savefig(folder / name, dpi=110), plt.close(fig)
            written.append(name)
        if "spectra" in extra:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            by_kind: dict[str, list] = {}
            for module, spectrum in extra["spectra"].items():
                by_kind.setdefault(module.rsplit(".", 1)[-1], []).append(spectrum)
            for (kind, spectra), color in zip(sorted(by_kind.items()), plt.cm.tab10.colors):
                for j, spectrum in enumerate(spectra):
                    x = [k / (len(spectrum) - 1) for k in range(len(spectrum))]
                    ax.plot(x, spectrum, color=color, alpha=0.35, lw=0.8, label=kind if j == 0 else None)
            tau = stage["summary"].get("tau")
            if tau is not None:
                ax.axhline(tau, color="black", ls="--", lw=1, label=f"tau = {tau:.3f}")
            ax.set(
                xlabel="singular value index / (rank - 1)",
                ylabel="normalised s'",
                title=f"stage {i}: normalised singular spectra",
                yscale="log",
                ylim=(1e-4, 1.1),
            )
            ax.legend(fontsize=8)
            name = f"spectra_stage{i}.png"
            fig.tight_layout(), fig.savefig(folder / name, dpi=110), plt.close(fig)
            written.append(name)
        if "train_loss" in extra:
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.plot(extra["train_loss"])
            ax.set(xlabel="step", ylabel="training loss", title=f"stage {i} ({stage['method']}): loss")
            name = f"loss_stage{i}.png"
            fig.tight_layout(), fig.savefig(folder / name, dpi=110), plt.close(fig)
            written.append(name)
    return written


def write_report(report: dict, series: list[dict], folder: Path) -> None:
    folder = Path(folder)
    report["figures"] = plot_figures(report, series, folder)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "report.md").write_text(render_markdown(report))
