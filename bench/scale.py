"""Memory and time at scale -> bench/results/scale.md (+ scale.json).

Each row is one `compress run` (a subprocess with its thread count fixed, as a user runs it) of a whitening
low-rank stage at 20 % (uniform ranks, sequential, 16 calibration windows of 512 tokens; token perplexity on 4
held-out windows), streamed layer by layer (the default for this recipe) or with `--in-memory`. Peak RSS is
the whole process's (report.json), against the checkpoint's fp32 bytes; seconds per layer come from the
stage's calibration summary. Models: SmolLM2-135M, and synthetic Llama-shaped checkpoints with random weights
(normal(0, 0.02), shards of at most 1 GB written one tensor at a time, SmolLM2's tokenizer) of about 0.5B,
1.3B, 3B and 7B parameters (the last with Llama-2-7B's shapes: about 27 GB in fp32, more than this machine's
RAM), kept in a cache folder outside the repository. A synthetic name with a depth suffix (``synthetic-7b-4l``) has
the same layers but only that many of them: on a lent GPU it gives the seconds per layer without writing and
walking the whole depth.

    python bench/scale.py smollm2-135m synthetic-0.5b          # the rows to (re)measure
    python bench/scale.py synthetic-7b-4l --device cuda --recipe lowrank-20 --paths streamed   # a GPU row
    python bench/scale.py --render                             # only rewrite the markdown from the json

``--recipe lowrank-20`` runs the shipped recipe's compression settings (dense-target whitening, sub-layer
calibration, sensitivity allocation, 64 windows) with this benchmark's evaluation and output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STORE, MARKDOWN = RESULTS / "scale.json", RESULTS / "scale.md"
CACHE = Path(os.environ.get("COMPRESS_SCALE_CACHE", Path.home() / ".cache" / "compress" / "synthetic"))

# name: (hidden, layers, intermediate, heads, kv_heads)
SYNTHETIC = {
    "synthetic-0.5b": (1536, 16, 4096, 12, 4),
    "synthetic-1.3b": (2048, 24, 5504, 16, 8),
    "synthetic-3b": (3072, 26, 8192, 24, 8),
    "synthetic-7b": (4096, 32, 11008, 32, 32),  # Llama-2-7B's shapes, SmolLM2's vocabulary
}
# stored as Llama-2-7B ships (16-bit), and compressed into bf16 (output.dtype auto): 27 GB of fp32 in and 22 GB
# out would not fit this machine's disk beside each other; the work itself is float32/float64 as for every row
STORED_BF16 = {"synthetic-7b"}
VOCAB = 49152
SHARD_BYTES = 1 << 30

RECIPE = {
    "name": "scale-whiten-20",
    "description": "whitening low rank at 20 % (uniform ranks), 16 calibration windows: the scale benchmark",
    "stages": [
        {
            "method": "lowrank",
            "targets": ["re:.*\\.(q|k|v|o|gate|up|down)_proj$"],
            "reduction": 0.2,
            "backend": "whiten",
            "sequential": True,
            "calibration_batch_size": 4,
        }
    ],
    "calibration": {"corpus": "wikipedia", "samples": 16, "seq_len": 512},
    "eval": {"tasks": [], "compare_dense": False, "perplexity_windows": 4},
    "output": {"dtype": "float32", "push_to_hub": None},
}


DEPTH_CUT = re.compile(r"-(\d+)l$")  # synthetic-7b-4l: synthetic-7b's first 4 layers


def synthetic_base(name: str) -> str | None:
    """The SYNTHETIC entry behind ``name`` (``synthetic-7b`` or its depth-cut ``synthetic-7b-4l``), or None."""
    base = DEPTH_CUT.sub("", name)
    return base if base in SYNTHETIC else None


def synthetic_shape(name: str) -> tuple[int, int, int, int, int]:
    hidden, layers, inter, heads, kv = SYNTHETIC[synthetic_base(name)]
    cut = DEPTH_CUT.search(name)
    return hidden, int(cut.group(1)) if cut else layers, inter, heads, kv


def tokenizer_folder() -> Path:
    """SmolLM2's tokenizer: ``$COMPRESS_SCALE_TOKENIZER`` (a folder holding it, for a machine without the bundled
    model's package), else the bundled model's folder."""
    if os.environ.get("COMPRESS_SCALE_TOKENIZER"):
        return Path(os.environ["COMPRESS_SCALE_TOKENIZER"])
    from compress.models import ensure_bundled

    return ensure_bundled("smollm2-135m")


def synthetic_checkpoint(name: str) -> Path:
    """The synthetic checkpoint ``name``, written once into the cache (tensor by tensor, 1 GB shards)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    folder = CACHE / name
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    hidden, layers, inter, heads, kv = synthetic_shape(name)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16" if synthetic_base(name) in STORED_BF16 else "float32",
    )
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(tokenizer_folder()).save_pretrained(tmp)
    head_dim = hidden // heads
    shapes = [("model.embed_tokens.weight", (VOCAB, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv * head_dim, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv * head_dim, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (VOCAB, hidden))]
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, size, count = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, count
        if shard:
            count += 1
            file = f"model-{count:05d}.safetensors"
            save_file(shard, tmp / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            shard, size = {}, 0

    total = 0
    dtype = torch.bfloat16 if synthetic_base(name) in STORED_BF16 else torch.float32
    for tensor_name, shape in shapes:
        if len(shape) == 1:
            value = torch.ones(shape, dtype=dtype)
        else:
            value = torch.empty(shape).normal_(0.0, 0.02, generator=generator).to(dtype)
        if size + value.nbytes > SHARD_BYTES:
            flush()
        shard[tensor_name] = value
        size += value.nbytes
        total += value.nbytes
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    tmp.rename(folder)
    return folder


def fp32_bytes(folder: Path) -> int:
    """The checkpoint's parameters at 4 bytes each, from its safetensors headers."""
    import struct

    total = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += 4 * count
    return total


def recipe_for(recipe: str, model: str) -> dict:
    """The benchmark's recipe (``whiten-20``; ``whiten-20-f32``: its statistics from float32 products), or the
    shipped ``lowrank-20``'s stages and calibration with this benchmark's evaluation and output; bf16-stored
    sources are written back in their dtype."""
    if recipe == "whiten-20":
        body = dict(RECIPE)
    elif recipe == "whiten-20-f32":  # each batch's input products in float32 (summed in float64)
        body = {**RECIPE, "calibration": {**RECIPE["calibration"], "statistics_dtype": "float32"}}
    else:
        shipped = yaml.safe_load((ROOT / "recipes" / f"{recipe}.yaml").read_text())
        body = {**shipped, "eval": RECIPE["eval"], "output": RECIPE["output"]}
    dtype = "auto" if synthetic_base(model) in STORED_BF16 else "float32"
    return {**body, "output": {**body["output"], "dtype": dtype}}


def run_row(
    model: str, in_memory: bool, threads: int, device: str = "cpu", recipe: str = "whiten-20", activations: str = "auto"
) -> dict:
    from compress.models import model_folder

    source = synthetic_checkpoint(model) if synthetic_base(model) else model_folder(model)
    body = recipe_for(recipe, model)
    if activations != "auto":  # where the layer walk holds its hidden states: a recipe of its own in the table
        body["calibration"] = {**body["calibration"], "activation_storage": activations}
        recipe = f"{recipe}-{activations}"
    tag = f"{model}-{'in-memory' if in_memory else 'streamed'}-{recipe}-{device}"
    out = ROOT / "runs" / "bench" / f"scale-{tag}"
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe_file = out.parent / f"{out.name}.recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(body, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "compress", "run", str(recipe_file), str(source), "--out", str(out)]
    command += ["--overwrite", "--quiet", "--device", device] + (["--in-memory"] if in_memory else [])
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{model} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][0]["summary"]
    calibration = stage["calibration"]
    targets = report["stages"][0]["rows"]
    # over the layers that hold targets: an allocation may keep a whole layer dense, which is not calibrated
    decoder_layers = len({re.search(r"layers\.(\d+)\.", r["module"]).group(1) for r in targets})
    layer_params = sum(r["params_before"] for r in targets) / decoder_layers
    row = {
        "model": model,
        "path": report["path"],
        "recipe": recipe,
        "device": device,
        "device_name": gpu_name() if device == "cuda" else "CPU",
        "threads": threads,
        "params": report["size"]["params_before"],
        "fp32_bytes": fp32_bytes(source),
        "peak_rss_bytes": report["timing"]["peak_rss_bytes"],
        "compression_peak_rss_bytes": stage["peak_rss_bytes"],  # by the end of compression, before the evaluation
        "peak_gpu_bytes": report["timing"].get("peak_gpu_bytes"),
        "compression_s": report["timing"]["compression_wall_time_s"],
        "run_s": time.perf_counter() - start,
        "layers": calibration["layers"],  # calibrated
        "decoder_layers": decoder_layers,
        "seconds_per_layer": calibration["layer_seconds_total"] / calibration["layers"],
        "phase_seconds": calibration.get("phase_seconds", {}),
        "peak_rss_at": calibration.get("peak_rss_at"),  # the phase (and layer) where the compression peak was set
        "targeted_params_per_layer": layer_params,
        "perplexity": report["eval_compressed"]["perplexity"]["perplexity"],
        "eval_path": report["eval_compressed"]["perplexity"]["path"],
        "date": time.strftime("%Y-%m-%d"),
    }
    shutil.rmtree(out / "model", ignore_errors=True)  # the numbers are kept; the weights are not needed
    return row


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def row_key(row: dict) -> tuple:
    """Rows measured before the device and recipe columns existed are CPU rows of the benchmark's recipe."""
    return row["model"], row["path"], row.get("device", "cpu"), row.get("recipe", "whiten-20")


def render(all_rows: list[dict]) -> str:
    rows = [r for r in all_rows if row_key(r)[2:] == ("cpu", "whiten-20")]
    lines = [
        "# Memory and time at scale",
        "",
        "Written by `python bench/scale.py`: each row is one `compress run` of a whitening low-rank stage at 20 % "
        "(uniform ranks, sequential, 16 calibration windows of 512 tokens, token perplexity on 4 held-out windows), "
        "streamed layer by layer (the default) or with `--in-memory`, on CPU. Peak RSS from report.json: by the "
        "end of compression (the stage's), and in brackets of the whole run (its evaluation runs the head on 128 "
        "tokens at a time since 2026-12-04 23:10; before, it held a batch's logits: 4 windows x 512 x the "
        "vocabulary in float32, 0.4 GB at 49,152); x fp32 = compression peak / the checkpoint's fp32 bytes. "
        "Synthetic models have random weights (their perplexity only shows that both paths agree). Each row "
        "is as of its date: a row measured before a memory change still shows the old code's numbers. Peak RSS "
        "is the run's own high-water mark (VmHWM) since 2026-12-04 21:24; before, getrusage's ru_maxrss, which "
        "also carries the peak of this benchmark's process, which starts the run (after generating a synthetic "
        "checkpoint, for one): those rows are upper bounds.",
        "",
        "| model | path | parameters | fp32 GB | peak RSS GiB: compression (run) | x fp32 | compression s | "
        "s / layer | targeted params / layer | held-out ppl | threads |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['path']} | {r['params'] / 1e6:,.0f} M | {r['fp32_bytes'] / 1e9:.2f} | "
            f"{r['compression_peak_rss_bytes'] / 2**30:.2f} ({r['peak_rss_bytes'] / 2**30:.2f}) | "
            f"{r['compression_peak_rss_bytes'] / r['fp32_bytes']:.3f} | "
            f"{r['compression_s']:.0f} | {r['seconds_per_layer']:.1f} | {r['targeted_params_per_layer'] / 1e6:.1f} M | "
            f"{r['perplexity']:.6g} | {r['threads']} |"
        )
    streamed = [r for r in rows if r["path"] == "streamed" and r["threads"] == 1]  # one thread: comparable times
    if len({r["model"] for r in streamed}) >= 2:
        import numpy as np

        x = np.array([r["targeted_params_per_layer"] for r in streamed])
        y = np.array([r["seconds_per_layer"] for r in streamed])
        slope, intercept = np.polyfit(x, y, 1)
        lines += [
            "",
            f"Seconds per layer against the layer's targeted parameters (streamed one-thread rows, least squares): "
            f"{slope * 1e6:.3f} s per million parameters + {intercept:.2f} s.",
        ]
    remeasured = [r for r in all_rows if r.get("before")]
    if remeasured:
        lines += [
            "",
            "Re-measured rows against their previous measurement (peak RSS GiB: compression (run); compression s):",
            "",
            "| model | path | before | after | code change since |",
            "|---|---|---|---|---|",
        ]
        for r in remeasured:
            b = r["before"]
            label = r["model"] + ("" if r in rows else f" ({r.get('recipe', 'whiten-20')}, {r.get('device_name')})")
            lines.append(
                f"| {label} | {r['path']} | {b['compression_peak_rss_bytes'] / 2**30:.2f} "
                f"({b['peak_rss_bytes'] / 2**30:.2f}); {b['compression_s']:.0f} s ({b['date']}) | "
                f"{r['compression_peak_rss_bytes'] / 2**30:.2f} ({r['peak_rss_bytes'] / 2**30:.2f}); "
                f"{r['compression_s']:.0f} s ({r['date']}) | {r.get('change', '')} |"
            )
    profiled = [r for r in rows if r.get("phase_seconds")]
    if profiled:
        phases = ["read", "forward", "statistics", "factorise", "write"]
        lines += [
            "",
            "Where the layer time goes (the engine's per-phase wall time, % of the layers' total): read = a "
            "streamed layer from the shards, forward = the layer's passes over the windows, statistics = the "
            "input covariances' accumulation (float64), factorise = the whitening Cholesky, product and SVD, "
            "write = the layer's output shard.",
            "",
            "| model | path | " + " | ".join(phases) + " |",
            "|---|---|" + "---|" * len(phases),
        ]
        for r in profiled:
            total = r["seconds_per_layer"] * r["layers"]
            shares = [f"{100 * r['phase_seconds'].get(p, 0.0) / total:.1f} %" for p in phases]
            lines.append(f"| {r['model']} | {r['path']} | " + " | ".join(shares) + " |")
    lines += render_other_rows([r for r in all_rows if r not in rows])
    notes = [f"- {' / '.join(row_key(r))}: {r['note']}" for r in all_rows if r.get("note")]
    return "\n".join(lines + (["", "Notes:", ""] + notes if notes else [])) + "\n"


def render_other_rows(rows: list[dict]) -> list[str]:
    """GPU rows and rows of the shipped lowrank-20's settings: seconds per layer, GPU and host memory."""
    if not rows:
        return []
    lines = [
        "",
        "## On a GPU, and with other settings",
        "",
        "`--device cuda` runs each layer on the GPU while the rest of the model stays in its shards; `-Nl` models "
        "are the synthetic model's first N layers (same shapes, the embedding and head included), enough for "
        "the seconds per layer. `lowrank-20` = the shipped recipe's compression (dense-target whitening, "
        "sub-layer calibration, sensitivity allocation, 64 windows, float32 products) with this benchmark's "
        "evaluation; `whiten-20-f32` = this benchmark's recipe with `calibration.statistics_dtype: float32` (each "
        "batch's input products in float32, summed in float64); a `-disk` recipe holds the layer walk's hidden "
        "states in files (`calibration.activation_storage: disk`). Peak GPU = torch's most allocated at once; "
        "phases as above.",
        "",
        "| model | recipe | device | layers calibrated | targeted params / layer | s / layer | compression s | "
        "peak GPU GiB | peak RSS GiB: compression (run) | x fp32 | read | forward | statistics | factorise | write | "
        "date |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        total = r["seconds_per_layer"] * r["layers"]
        shares = [
            f"{100 * r.get('phase_seconds', {}).get(p, 0.0) / total:.0f} %"
            for p in ("read", "forward", "statistics", "factorise", "write")
        ]
        gpu = f"{r['peak_gpu_bytes'] / 2**30:.1f}" if r.get("peak_gpu_bytes") else "-"
        on_gpu = r.get("device", "cpu") == "cuda"
        device = r.get("device_name", "CPU") + ("" if on_gpu else f", {r['threads']} thread(s)")
        lines.append(
            f"| {r['model']} | {r.get('recipe', 'whiten-20')} | {device} | "
            f"{r['layers']} of {r.get('decoder_layers', r['layers'])} | "
            f"{r['targeted_params_per_layer'] / 1e6:.1f} M | {r['seconds_per_layer']:.2f} | {r['compression_s']:.0f} | "
            f"{gpu} | {r['compression_peak_rss_bytes'] / 2**30:.2f} ({r['peak_rss_bytes'] / 2**30:.2f}) | "
            f"{r['compression_peak_rss_bytes'] / r['fp32_bytes']:.3f} | " + " | ".join(shares) + f" | {r['date']} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="smollm2-135m, gemma3-270m or " + ", ".join(SYNTHETIC))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--recipe", default="whiten-20", choices=["whiten-20", "whiten-20-f32", "lowrank-20"])
    parser.add_argument(
        "--activations",
        default="auto",
        choices=["auto", "device", "cpu", "disk"],
        help="calibration.activation_storage (not auto: the row's recipe is named RECIPE-PLACE)",
    )
    parser.add_argument("--paths", nargs="+", default=["streamed", "in-memory"], choices=["streamed", "in-memory"])
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--change", default="", help="what changed since a re-measured row's last measurement")
    args = parser.parse_args()
    rows = json.loads(STORE.read_text()) if STORE.is_file() else []
    if not args.render:
        for model in args.models:
            for path in args.paths:
                row = run_row(model, path == "in-memory", args.threads, args.device, args.recipe, args.activations)
                row["change"] = args.change
                old = next((r for r in rows if row_key(r) == row_key(row)), None)
                if old is not None:  # the last measurement stays beside the new one (before / after)
                    row["before"] = {k: v for k, v in old.items() if k != "before"}
                rows = [r for r in rows if r is not old] + [row]
                STORE.write_text(json.dumps(rows, indent=2))
                print(json.dumps(row), flush=True)
    MARKDOWN.write_text(render(rows))


if __name__ == "__main__":
    main()
