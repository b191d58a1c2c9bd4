#!/usr/bin/env python
"""Correctness and speed of the compress.kernels Triton ops; writes bench/results/kernels.md.

  python bench/kernel_checks.py --cpu-smoke   # Triton kernels under TRITON_INTERPRET=1 on the CPU vs the
                                        # float64 reference (small shapes); exit 1 on any mismatch
  python bench/kernel_checks.py --gpu         # on a CUDA GPU: the same checks on the compiled kernels, then
                                        # median times at LLM shapes vs cuBLAS dense and torch 2:4

Each mode rewrites its own section of the results file and keeps the other one.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.md"
H200_TFLOPS_BF16 = 989.0  # dense bf16 tensor-core peak, TFLOP/s
H200_TBPS = 4.8  # HBM3e bandwidth, TB/s
SECTIONS = ("cpu-smoke", "gpu")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cpu-smoke", action="store_true", help="interpreter correctness checks on the CPU")
    mode.add_argument("--gpu", action="store_true", help="compiled-kernel checks and timings on a CUDA GPU")
    p.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.relative_to(RESULTS.parents[2])}")
    p.add_argument("--tokens", default="1,16,2048", help="token counts timed in --gpu mode")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------
# results file


def _write_section(name: str, body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else ""
    blocks = {}
    for sec in SECTIONS:
        m = re.search(rf"<!-- {sec}:begin -->\n(.*?)<!-- {sec}:end -->", text, re.S)
        blocks[sec] = m.group(1) if m else ""
    blocks[name] = body.rstrip() + "\n"
    if not blocks["gpu"]:
        blocks["gpu"] = (
            "## GPU\n\nGPU numbers pending: no GPU lent yet. Run `bash bench/gpu_check.sh` on a CUDA machine.\n"
        )
    header = (
        "# compress.kernels: correctness and speed\n\n"
        "Written by `bench/kernel_checks.py` (`--cpu-smoke` and `--gpu` each rewrite their own section).\n\n"
        "Correctness: each op runs with its backend forced and NaN-poisoned outputs; the output and the\n"
        "gradient of every float input are compared with the reference evaluated in float64 through\n"
        "autograd. Error = relative error ||out - ref|| / ||ref||; a table row shows the worst tensor of\n"
        "its (op, case, dtype). Tolerances: float32 1e-5, float16 2e-3, bfloat16 2e-2.\n\n"
        "Speed (GPU only): median of `triton.testing.do_bench` after warm-up, bf16; speed-up is dense time\n"
        "/ op time measured in the same run; TFLOP/s counts the op's own multiply-adds x2; GB/s counts the\n"
        "minimum traffic (weights + x + y once); roofline % = max(FLOP/989 TFLOP/s, bytes/4.8 TB/s) / time.\n\n"
    )
    out = header + "".join(f"<!-- {sec}:begin -->\n{blocks[sec]}<!-- {sec}:end -->\n\n" for sec in SECTIONS)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(out.rstrip() + "\n")


def _env_line(device: str) -> str:
    import torch
    import triton

    return (
        f"{datetime.date.today().isoformat()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"python {platform.python_version()}, device: {device}"
    )


# ----------------------------------------------------------------------------------------------
# correctness


def _correctness(cases, dtypes, device: str) -> tuple[str, bool, float]:
    from compress.kernels import testing

    t0 = time.perf_counter()
    results = testing.run_suite(cases, dtypes, device=device, backend="triton")
    seconds = time.perf_counter() - t0
    table = testing.table(results)
    print(table)
    failures = testing.report(results)
    if failures:
        print("\nMISMATCHES:\n" + failures)
    return table, not failures, seconds


def cpu_smoke(write: bool) -> int:
    import torch

    from compress.kernels import testing

    table, ok, seconds = _correctness(testing.CASES, (torch.float32, torch.bfloat16), "cpu")
    verdict = "all checks passed" if ok else "**MISMATCH: see the rows marked above**"
    body = (
        "## CPU smoke (Triton interpreter)\n\n`python bench/kernel_checks.py --cpu-smoke`: "
        f"{_env_line('CPU, TRITON_INTERPRET=1')}; "
        f"{seconds:.1f} s; {verdict}.\nForward + backward (gradients of x, the factors and the bias).\n\n{table}\n"
    )
    if write:
        _write_section("cpu-smoke", body)
    print(f"\ncpu-smoke: {'ok' if ok else 'MISMATCH'} in {seconds:.1f} s")
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------
# GPU timing


def _round16(v: float) -> int:
    return max(16, int(v) // 16 * 16)


def _settings(n: int, m: int) -> dict:
    """Rank / sparsity settings that keep ~50 % of the dense m x n parameters."""
    half = 0.5 * m * n
    s = 16  # non-zeros per column of S (dense_sparse)
    c = n // 32  # sparse input channels (lowrank_sparse)
    return dict(
        k_lowrank=_round16(half / (m + n)),
        s=s,
        k_ds=_round16((half - s * n) / m),
        c=c,
        r=_round16((half - m * c) / (m + n)),
    )


LLM_SHAPES = ((4096, 4096), (4096, 11008))  # (n in, m out)


def _do_bench(fn) -> float:
    import torch
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _timings(tokens: list[int], shapes=LLM_SHAPES, device: str = "cuda", timer=_do_bench) -> tuple[str, list[str]]:
    """The speed table. ``device``/``timer`` exist so the table code can be dry-run on the CPU."""
    import torch
    import torch.nn.functional as F

    import compress.kernels as K
    from compress.kernels.dense_sparse.reference import dense_sparse_linear_ref
    from compress.kernels.lowrank.reference import lowrank_linear_ref
    from compress.kernels.lowrank_sparse.reference import lowrank_sparse_linear_ref
    from compress.kernels.sparse_format import colsparse_to_dense, dense_to_colsparse, storage_bytes

    dev, dt = device, torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    notes: list[str] = []
    rows = [
        "| n -> m | tokens | op | setting | params % dense | time ms | speed-up vs dense | TFLOP/s | GB/s "
        "| roofline % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32).mul_(scale).to(dt)

    for n, m in shapes:
        st = _settings(n, m)
        W = rnd(m, n, scale=n**-0.5)
        A, B = rnd(m, st["k_lowrank"], scale=st["k_lowrank"] ** -0.5), rnd(st["k_lowrank"], n, scale=n**-0.5)
        D = rnd(m, st["k_ds"], scale=st["k_ds"] ** -0.5)
        values, indices = dense_to_colsparse(rnd(st["k_ds"], n, scale=n**-0.5), st["s"], index_dtype=torch.int16)
        S_dense = colsparse_to_dense(values, indices, st["k_ds"])
        U, V = rnd(m, st["r"], scale=st["r"] ** -0.5), rnd(st["r"], n, scale=n**-0.5)
        channels = torch.randperm(n, device=dev, generator=gen)[: st["c"]].sort().values.to(torch.int32)
        sc_values = rnd(m, st["c"], scale=st["c"] ** -0.5)
        W24 = _prune_24(W)
        try:
            from torch.sparse import to_sparse_semi_structured

            W24s = to_sparse_semi_structured(W24)
        except Exception as err:  # reported in the table, never hidden
            W24s = None
            notes.append(f"torch 2:4 semi-structured unavailable for {n}->{m}: {type(err).__name__}: {err}")

        dense_params = m * n
        for T in tokens:
            x = rnd(T, n)
            io_bytes = 2 * (T * n + T * m)
            variants = [
                ("dense (cuBLAS)", "W m x n", dense_params, 2 * T * m * n, 2 * m * n, lambda: F.linear(x, W)),
                (
                    "lowrank_linear (Triton)",
                    f"k={st['k_lowrank']}",
                    st["k_lowrank"] * (m + n),
                    2 * T * st["k_lowrank"] * (m + n),
                    2 * st["k_lowrank"] * (m + n),
                    lambda: K.lowrank_linear(x, A, B),
                ),
                (
                    "lowrank, 2 x cuBLAS",
                    f"k={st['k_lowrank']}",
                    st["k_lowrank"] * (m + n),
                    2 * T * st["k_lowrank"] * (m + n),
                    2 * st["k_lowrank"] * (m + n),
                    lambda: F.linear(F.linear(x, B), A),
                ),
                (
                    "dense_sparse_linear (Triton)",
                    f"k={st['k_ds']}, s={st['s']}",
                    m * st["k_ds"] + values.numel(),
                    2 * T * (m * st["k_ds"] + values.numel()),
                    2 * m * st["k_ds"] + storage_bytes(values, indices),
                    lambda: K.dense_sparse_linear(x, D, values, indices, st["k_ds"]),
                ),
                (
                    "dense_sparse, 2 x cuBLAS (S dense)",
                    f"k={st['k_ds']}",
                    m * st["k_ds"] + values.numel(),
                    2 * T * (m * st["k_ds"] + values.numel()),
                    2 * (m + n) * st["k_ds"],
                    lambda: F.linear(F.linear(x, S_dense), D),
                ),
                (
                    "lowrank_sparse_linear (Triton)",
                    f"r={st['r']}, c={st['c']}",
                    st["r"] * (m + n) + m * st["c"],
                    2 * T * (st["r"] * (m + n) + m * st["c"]),
                    2 * (st["r"] * (m + n) + m * st["c"]),
                    lambda: K.lowrank_sparse_linear(x, U, V, sc_values, channels),
                ),
                (
                    "lowrank_sparse, torch ops",
                    f"r={st['r']}, c={st['c']}",
                    st["r"] * (m + n) + m * st["c"],
                    2 * T * (st["r"] * (m + n) + m * st["c"]),
                    2 * (st["r"] * (m + n) + m * st["c"]),
                    lambda: F.linear(F.linear(x, V), U) + F.linear(x.index_select(1, channels), sc_values),
                ),
            ]
            # the default path (the reference) beside each kernel: same work, same bytes
            references = {
                "lowrank_linear (Triton)": lambda: lowrank_linear_ref(x, A, B),
                "dense_sparse_linear (Triton)": lambda: dense_sparse_linear_ref(x, D, values, indices, st["k_ds"]),
                "lowrank_sparse_linear (Triton)": lambda: lowrank_sparse_linear_ref(x, U, V, sc_values, channels),
            }
            with_references = []
            for variant in variants:
                with_references.append(variant)
                if variant[0] in references:
                    name = variant[0].replace("(Triton)", "reference (default)")
                    with_references.append((name, *variant[1:5], references[variant[0]]))
            variants = with_references
            if W24s is not None:
                variants.append(
                    (
                        "torch 2:4 semi-structured",
                        "W 2:4",
                        dense_params // 2,
                        T * m * n,
                        m * n + m * n // 8,
                        lambda: F.linear(x, W24s),
                    )
                )
            dense_ms = None
            for name, setting, params, flops, weight_bytes, fn in variants:
                try:
                    ms = timer(fn)
                except Exception as err:  # e.g. a shape the 2:4 path rejects: reported, never hidden
                    notes.append(f"{name} {n}->{m} T={T}: {type(err).__name__}: {str(err)[:200]}")
                    rows.append(
                        f"| {n} -> {m} | {T} | {name} | {setting} | {100 * params / dense_params:.1f} | error | | | | |"
                    )
                    continue
                if name == "dense (cuBLAS)":
                    dense_ms = ms
                nbytes = weight_bytes + io_bytes
                roof_s = max(flops / (H200_TFLOPS_BF16 * 1e12), nbytes / (H200_TBPS * 1e12))
                rows.append(
                    f"| {n} -> {m} | {T} | {name} | {setting} | {100 * params / dense_params:.1f} | {ms:.4f} | "
                    f"{dense_ms / ms if dense_ms else float('nan'):.2f} | {flops / ms / 1e9:.1f} | "
                    f"{nbytes / ms / 1e6:.0f} | "
                    f"{100 * roof_s / (ms * 1e-3):.1f} |"
                )
                print(rows[-1], flush=True)
    return "\n".join(rows), notes


def _prune_24(W):
    """Keep the 2 largest of every 4 consecutive weights along the input dimension (torch's 2:4 layout)."""
    m, n = W.shape
    groups = W.reshape(m, n // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = groups.new_zeros(groups.shape, dtype=bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(m, n)


def gpu(write: bool, tokens: list[int]) -> int:
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET for --gpu: the compiled kernels are what is measured", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("--gpu needs a CUDA device", file=sys.stderr)
        return 2
    from compress.kernels import testing

    name = torch.cuda.get_device_name()
    table, ok, seconds = _correctness(testing.CASES, (torch.float32, torch.bfloat16), "cuda")
    big_table, big_ok, big_seconds = _correctness(testing.GPU_CASES, (torch.bfloat16,), "cuda")
    from compress.kernels import force_backend

    with force_backend("triton"):  # the ops' own rows time the kernels; the reference rows call it directly
        timing, notes = _timings(tokens)
    verdict = "all checks passed" if ok and big_ok else "**MISMATCH: see the rows marked above**"
    body = (
        f"## GPU\n\n`bash bench/gpu_check.sh`: {_env_line(name)}.\n\n"
        f"### Correctness on the GPU ({verdict}; {seconds + big_seconds:.0f} s incl. compilation)\n\n"
        f"{table}\n\n{big_table}\n\n"
        f"### Speed (bf16; settings keep ~50 % of the dense parameters)\n\n{timing}\n"
    )
    if notes:
        body += "\nNotes:\n" + "".join(f"- {line}\n" for line in notes)
    if write:
        _write_section("gpu", body)
    return 0 if ok and big_ok else 1


def main() -> int:
    args = _parse()
    if args.cpu_smoke:
        # must happen before triton is imported: the kernels then run in the interpreter on the CPU
        os.environ["TRITON_INTERPRET"] = "1"
        return cpu_smoke(not args.no_write)
    return gpu(not args.no_write, [int(t) for t in args.tokens.split(",")])


if __name__ == "__main__":
    sys.exit(main())
