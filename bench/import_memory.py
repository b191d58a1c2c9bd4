"""Resident memory of `compress run`'s process before it reads a weight: what each import adds.

Every peak RSS in bench/results/ counts the libraries the process imported; this measures that floor in a fresh
interpreter (one per row, so each row's imports are all that is loaded) -> bench/results/import_memory.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "import_memory.md"

# each step imports what the one before did, plus its own
STEPS = [
    ("python", ""),
    ("torch", "import torch"),
    ("transformers (package)", "import transformers"),
    ("compress CLI", "import compress.cli"),
    ("transformers' model classes", "import transformers.modeling_utils; from transformers import LlamaForCausalLM"),
    ("compress pipeline, engine, streaming", "import compress.pipeline, compress.activations, compress.streaming"),
]

PROBE = """
import sys
{imports}
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
tops = sorted({{name.split(".")[0] for name in sys.modules}})
print(rss * 1024, " ".join(tops))
"""


def measure(upto: int) -> tuple[int, set[str]]:
    imports = "\n".join(code for _, code in STEPS[: upto + 1] if code)
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(imports=imports)], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    return int(out[0]), set(out[1:])


def main() -> None:
    rows, before_modules = [], set()
    for i, (label, _) in enumerate(STEPS):
        rss, modules = measure(i)
        heavy = sorted(m for m in modules - before_modules if m in {"sympy", "scipy", "triton", "numpy", "kernels"})
        rows.append((label, rss, heavy))
        before_modules = modules
    lines = [
        "# Memory before the first weight",
        "",
        "Written by `python bench/import_memory.py`: resident memory (VmRSS) of a fresh interpreter after each "
        "step's imports (each step includes the ones above it), "
        f"{time.strftime('%Y-%m-%d')}. Every peak RSS in this folder includes this floor. The heavy packages "
        "come in through transformers (`python -X importtime` shows the chains): its quantizer registry, which "
        "compress's checkpoint format registers with, and its modeling_utils import torch.distributed.tensor "
        "(sympy), torch._dynamo (triton), the hub-kernels package and scipy (its detection losses).",
        "",
        "| after importing | RSS MiB | added MiB | heavy packages it pulled in |",
        "|---|---|---|---|",
    ]
    previous = 0
    for label, rss, heavy in rows:
        lines.append(f"| {label} | {rss / 2**20:.0f} | {(rss - previous) / 2**20:+.0f} | {', '.join(heavy) or '-'} |")
        previous = rss
    OUT.write_text("\n".join(lines) + "\n")
    OUT.with_suffix(".json").write_text(json.dumps([dict(zip(("step", "rss_bytes", "pulled_in"), r)) for r in rows]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
