"""Correctness checks shared by tests/kernels and bench/kernel_checks.py (no triton import here).

``check(op, case, dtype)`` runs the public op with a forced backend and NaN-poisoned outputs,
backpropagates a fixed random upstream gradient, and compares the output and the gradient of
every float input with the reference evaluated in float64 through autograd. The error measure is
the relative error ||out - ref|| / ||ref||; every result also carries the max abs error, where it
is, and how many non-finite elements the output had (a poisoned element nobody wrote stays NaN).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ._alloc import poison_outputs
from ._dispatch import dispatch_counts, force_backend, triton_config
from .dense_sparse import dense_sparse_linear
from .dense_sparse.reference import dense_sparse_linear_ref
from .lowrank import lowrank_linear
from .lowrank.reference import lowrank_linear_ref
from .lowrank_sparse import lowrank_sparse_linear
from .lowrank_sparse.reference import lowrank_sparse_linear_ref
from .sparse_format import dense_to_colsparse, dense_to_nm_colsparse

# dtype -> max relative error ||out - ref|| / ||ref|| against the float64 reference.
# fp32: both the interpreter and the kernels (IEEE fp32 dot, no TF32) are ~1e-7; bf16 has an
# 8-bit mantissa (unit roundoff 2^-9 ~ 2e-3: inputs rounded, h rounded, output rounded).
TOLERANCES: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


OPS: dict[str, tuple[Callable, Callable]] = {
    "lowrank_linear": (lowrank_linear, lowrank_linear_ref),
    "dense_sparse_linear": (dense_sparse_linear, dense_sparse_linear_ref),
    "lowrank_sparse_linear": (lowrank_sparse_linear, lowrank_sparse_linear_ref),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """x is [*lead, n]; the op maps n -> m through width k (rank k / rows of S / rank r).
    s = non-zeros per column (dense_sparse) or number of sparse channels c (lowrank_sparse)."""

    name: str
    lead: tuple
    n: int
    m: int
    k: int
    s: int = 0
    bias: bool = True
    index_dtype: torch.dtype = torch.int32
    pattern: str = "topk"  # dense_sparse: "topk" or "2:4"
    noncontig: bool = False  # x and the m-side factor as transposed views
    config: tuple = ()  # triton_config overrides as (key, value) pairs


CASES: dict[str, list[Case]] = {
    "lowrank_linear": [
        Case("t33_n127_m63_k17", (33,), 127, 63, 17),
        Case("t1_nobias", (1,), 127, 63, 17, bias=False),
        Case("x3d_2x5", (2, 5), 127, 63, 17),
        Case(
            "kchunk16_msplit2",
            (33,),
            127,
            63,
            17,
            config=(("k_chunk", 16), ("m_split", 2), ("block_m", 16), ("block_t", 16), ("block_n", 32)),
        ),
        Case("noncontig", (33,), 127, 63, 17, noncontig=True),
    ],
    "dense_sparse_linear": [
        Case("t33_k17_s3_i16", (33,), 127, 63, 17, s=3, index_dtype=torch.int16),
        Case("t1_s1_i32_nobias", (1,), 127, 63, 17, s=1, bias=False),
        Case("x3d_2x5", (2, 5), 127, 63, 17, s=4),
        Case("2to4_k20", (33,), 127, 63, 20, s=10, pattern="2:4", index_dtype=torch.int16),
        Case(
            "k40_kchunk16_msplit2",
            (33,),
            127,
            63,
            40,
            s=5,
            config=(("k_chunk", 16), ("m_split", 2), ("block_m", 16), ("block_n", 32)),
        ),
    ],
    "lowrank_sparse_linear": [
        Case("t33_r17_c9_i32", (33,), 127, 63, 17, s=9),
        Case("t1_c9_i64_nobias", (1,), 127, 63, 17, s=9, bias=False, index_dtype=torch.int64),
        Case("x3d_2x5_c0", (2, 5), 127, 63, 17, s=0),
        Case("c70_blocks", (33,), 127, 63, 17, s=70),
        Case(
            "r40_kchunk16_msplit3",
            (33,),
            127,
            63,
            40,
            s=9,
            noncontig=True,
            config=(("k_chunk", 16), ("m_split", 3), ("block_m", 16)),
        ),
    ],
}

# Bigger shapes for a real GPU (bench/kernel_checks.py GPU mode): k above one chunk, many token tiles.
GPU_CASES: dict[str, list[Case]] = {
    "lowrank_linear": [
        Case("t300_n1024_m1000_k700", (300,), 1024, 1000, 700),
        Case("t1_n4096_m4096_k1024", (1,), 4096, 4096, 1024),
    ],
    "dense_sparse_linear": [
        Case("t300_n1024_m1000_k600_s8", (300,), 1024, 1000, 600, s=8, index_dtype=torch.int16),
        Case("t1_n4096_m4096_k1024_s16", (1,), 4096, 4096, 1024, s=16),
    ],
    "lowrank_sparse_linear": [
        Case("t300_n1024_m1000_r600_c100", (300,), 1024, 1000, 600, s=100),
        Case("t1_n4096_m4096_r900_c256", (1,), 4096, 4096, 900, s=256),
    ],
}


def make_inputs(op: str, case: Case, dtype: torch.dtype, device="cpu", seed: int = 0) -> dict:
    """Keyword arguments for the public op, float tensors in ``dtype`` with O(1) outputs."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    def m_side(rows, cols, scale):  # [rows, cols], optionally a transposed (non-contiguous) view
        if case.noncontig:
            return randn(cols, rows, scale=scale).T
        return randn(rows, cols, scale=scale)

    n, m, k = case.n, case.m, case.k
    if case.noncontig:
        if len(case.lead) != 1:
            raise ValueError("noncontig cases need a 2-D x")
        x = randn(n, case.lead[0]).T
    else:
        x = randn(*case.lead, n)
    bias = randn(m) if case.bias else None
    if op == "lowrank_linear":
        return dict(x=x, A=m_side(m, k, k**-0.5), B=randn(k, n, scale=n**-0.5), bias=bias)
    if op == "dense_sparse_linear":
        S = torch.randn(k, n, generator=gen, dtype=torch.float64)
        if case.pattern == "2:4":
            values, indices = dense_to_nm_colsparse(S, 2, 4, index_dtype=case.index_dtype)
            if values.shape[0] != case.s:
                raise ValueError(f"case {case.name}: 2:4 of k={k} gives s={values.shape[0]}, not {case.s}")
        else:
            values, indices = dense_to_colsparse(S, case.s, index_dtype=case.index_dtype)
        values = (values * n**-0.5 * (k / max(case.s, 1)) ** 0.5).to(dtype).to(device)
        return dict(x=x, D=m_side(m, k, k**-0.5), values=values, indices=indices.to(device), k=k, bias=bias)
    if op == "lowrank_sparse_linear":
        channels = torch.randperm(n, generator=gen)[: case.s].sort().values.to(case.index_dtype).to(device)
        return dict(
            x=x,
            U=m_side(m, k, k**-0.5),
            V=randn(k, n, scale=n**-0.5),
            sc_values=randn(m, case.s, scale=max(case.s, 1) ** -0.5),
            sc_channels=channels,
            bias=bias,
        )
    raise KeyError(op)


@dataclasses.dataclass
class Result:
    op: str
    case: str
    dtype: str
    backend: str
    tensor: str  # "y" or "grad_<name>"
    rel_err: float
    max_abs_err: float
    where: tuple
    got: float
    want: float
    nonfinite: int
    first_nonfinite: tuple | None
    tol: float
    ok: bool
    note: str = ""

    def describe(self) -> str:
        status = "ok" if self.ok else "MISMATCH"
        text = (
            f"{status}: {self.op}[{self.case}] {self.dtype} {self.backend} {self.tensor}: "
            f"rel_err={self.rel_err:.3e} (tol {self.tol:.1e}), max_abs_err={self.max_abs_err:.3e} "
            f"at {self.where} (got {self.got:.6g}, want {self.want:.6g})"
        )
        if self.nonfinite:
            text += f"; {self.nonfinite} non-finite elements, first at {self.first_nonfinite}"
        if self.note:
            text += f"; {self.note}"
        return text


def compare(out: torch.Tensor | None, ref: torch.Tensor, tol: float, **meta) -> Result:
    if out is None:
        return Result(
            tensor=meta.pop("tensor"),
            rel_err=float("inf"),
            max_abs_err=float("inf"),
            where=(),
            got=float("nan"),
            want=float("nan"),
            nonfinite=0,
            first_nonfinite=None,
            tol=tol,
            ok=False,
            note="no gradient was produced",
            **meta,
        )
    if out.shape != ref.shape:
        raise AssertionError(f"{meta}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    o = out.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    bad = ~torch.isfinite(o)
    nonfinite = int(bad.sum())
    first_bad = tuple(int(i) for i in bad.nonzero()[0]) if nonfinite else None
    diff = (o - r).abs()
    diff = torch.where(bad, torch.full_like(diff, float("inf")), diff)
    if diff.numel():
        flat = int(diff.argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
        max_abs, got, want = float(diff.reshape(-1)[flat]), float(o.reshape(-1)[flat]), float(r.reshape(-1)[flat])
    else:
        where, max_abs, got, want = (), 0.0, 0.0, 0.0
    ref_norm = float(r.norm())
    err_norm = float((o - r).norm()) if not nonfinite else float("inf")
    rel = err_norm / ref_norm if ref_norm > 0 else err_norm
    ok = nonfinite == 0 and rel <= tol
    return Result(
        rel_err=rel,
        max_abs_err=max_abs,
        where=where,
        got=got,
        want=want,
        nonfinite=nonfinite,
        first_nonfinite=first_bad,
        tol=tol,
        ok=ok,
        **meta,
    )


def check(
    op: str, case: Case, dtype: torch.dtype, device="cpu", backend: str = "triton", backward: bool = True, seed: int = 0
) -> list[Result]:
    """Run ``op`` on ``case`` with ``backend`` forced and compare with the float64 reference."""
    fn, ref_fn = OPS[op]
    tol = TOLERANCES[dtype]
    args = make_inputs(op, case, dtype, device, seed)
    floats = [name for name, v in args.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    run_args = {name: (v.detach().requires_grad_(backward) if name in floats else v) for name, v in args.items()}
    ref_args = {
        name: (v.detach().to(torch.float64).requires_grad_(backward) if name in floats else v)
        for name, v in args.items()
    }
    meta = dict(op=op, case=case.name, dtype=str(dtype).replace("torch.", ""), backend=backend)

    before = dispatch_counts[(op, backend)]
    with force_backend(backend), poison_outputs(), triton_config(**dict(case.config)):
        y = fn(**run_args)
    if dispatch_counts[(op, backend)] != before + 1:
        raise AssertionError(f"{op}[{case.name}]: backend {backend!r} did not run")
    y_ref = ref_fn(**ref_args)
    results = [compare(y, y_ref, tol, tensor="y", **meta)]
    if backward:
        gen = torch.Generator().manual_seed(seed + 1)
        g = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
        y.backward(g.to(dtype).to(y.device))
        y_ref.backward(g.to(y_ref.device))
        for name in floats:
            results.append(compare(run_args[name].grad, ref_args[name].grad, tol, tensor=f"grad_{name}", **meta))
    return results


def run_suite(
    cases: dict[str, list[Case]], dtypes, device="cpu", backend: str = "triton", backward: bool = True
) -> list[Result]:
    """``check`` over every (op, case, dtype)."""
    results: list[Result] = []
    for op, op_cases in cases.items():
        for case in op_cases:
            for dtype in dtypes:
                results += check(op, case, dtype, device=device, backend=backend, backward=backward)
    return results


def report(results: list[Result]) -> str:
    """A verbose multi-line report of the failing results (empty when all passed)."""
    return "\n".join(r.describe() for r in results if not r.ok)


def table(results: list[Result]) -> str:
    """A Markdown table: one row per (op, case, dtype), the worst tensor's numbers."""
    rows = [
        "| op | case | dtype | backend | worst tensor | rel err | tol | max abs err (where) | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.op, r.case, r.dtype, r.backend), []).append(r)
    for (op, case, dtype, backend), rs in groups.items():
        worst = max(rs, key=lambda r: (not r.ok, r.rel_err / r.tol))
        status = "ok" if all(r.ok for r in rs) else "**MISMATCH**"
        rows.append(
            f"| {op} | {case} | {dtype} | {backend} | {worst.tensor} | {worst.rel_err:.2e} | "
            f"{worst.tol:.0e} | {worst.max_abs_err:.2e} {worst.where} | {status} |"
        )
    return "\n".join(rows)
