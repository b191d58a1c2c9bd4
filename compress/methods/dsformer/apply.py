"""DSFormer: W ~= D S (dense x column-sparse), one-shot alternating IHT/least squares, optional STF training."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ...modules import DenseSparseLinear
from ...modules.dense_sparse import index_dtype_for
from ...registry import register_method
from ...targets import replace_module
from ..base import Method, Plan, Replacement, StageResult, check_linear, summarise_factors
from ..scaling import fit_weights
from .config import DSFormerConfig
from .factorize import dense_sparse_factorize
from .stf import STFDenseSparseLinear


@dataclass(frozen=True)
class DSShape:
    k: int
    s: int

    def params(self, m: int, n: int) -> int:
        return m * self.k + self.s * n


def dsformer_shape(
    m: int,
    n: int,
    reduction: float,
    sparsity: float,
    nnz_per_column: int | None = None,
    pattern: str = "topk",
    budget_unit: str = "params",
    value_bytes: int = 4,
) -> DSShape | None:
    """(k, s) for an m x n matrix keeping at most (1 - reduction) m n values (None = stays dense).

    With ``budget_unit='bytes'`` each stored index costs index_bytes / value_bytes of a value.
    """
    budget = int((1.0 - reduction) * m * n)

    def index_cost(k: int) -> float:
        if budget_unit != "bytes":
            return 1.0
        return 1.0 + torch.empty(0, dtype=index_dtype_for(k)).element_size() / value_bytes

    if nnz_per_column is not None:
        s = nnz_per_column
        k = int((budget - index_cost(budget // m) * s * n) // m)
        k = int((budget - index_cost(k) * s * n) // m)
    elif pattern == "2:4":
        k = int(budget / (m + index_cost(budget // m) * n / 2)) // 4 * 4
        s = k // 2
    else:
        density = 1.0 - sparsity
        k = int(budget / (m + index_cost(budget // m) * density * n))
        s = max(1, round(density * k))
        k = int((budget - index_cost(k) * s * n) // m)
    if k < 1 or s < 1 or s > k:
        return None
    if pattern != "2:4" and nnz_per_column is None:  # spend what rounding left over on more non-zeros
        s = min(k, s + int((budget - m * k - index_cost(k) * s * n) // (index_cost(k) * n)))
    shape = DSShape(k, s)
    if shape.params(m, n) > budget or shape.params(m, n) >= m * n:
        return None
    index_bytes = torch.empty(0, dtype=index_dtype_for(k)).element_size()
    if m * k * value_bytes + s * n * (value_bytes + index_bytes) >= m * n * value_bytes:
        return None  # fewer values but no fewer bytes: not worth replacing
    return shape


@register_method
class DSFormer(Method):
    name = "dsformer"
    config_class = DSFormerConfig
    summary = "DSFormer: W ~= D S with s non-zeros per column of S (IHT/ALS one-shot, optional STF training)"

    def calibration(self, config: DSFormerConfig):
        return config.scaling_calibration()

    def plan(self, modules: dict[str, nn.Module], config: DSFormerConfig, planner) -> Plan:
        decisions, result = {}, StageResult(self.name)
        for name, module in modules.items():
            check_linear(self.name, name, module)
            m, n = module.out_features, module.in_features
            shape = dsformer_shape(
                m,
                n,
                config.reduction,
                config.column_sparsity,
                config.nnz_per_column,
                config.pattern,
                config.budget_unit,
                planner.stored_value_bytes(module),
            )
            decisions[name] = shape
            after = shape.params(m, n) if shape else m * n
            index_bytes = shape.s * n * torch.empty(0, dtype=index_dtype_for(shape.k)).element_size() if shape else 0
            result.rows.append(
                {
                    "module": name,
                    "shape": f"{m}x{n}",
                    "k": shape.k if shape else None,
                    "s": shape.s if shape else None,
                    "replaced": shape is not None,
                    "params_before": m * n,
                    "params_after": after,
                    "index_bytes": index_bytes,
                }
            )
        summarise_factors(result, config.reduction)
        result.summary.update(
            {
                "sparsity": config.column_sparsity,
                "pattern": config.pattern,
                "budget_unit": config.budget_unit,
                "scaling": config.scaling,
            }
        )
        return Plan(decisions, result)

    def apply(self, name, module: nn.Linear, config: DSFormerConfig, shape: DSShape, stats) -> Replacement:
        factors = dense_sparse_factorize(
            module.weight,
            shape.k,
            shape.s,
            config.iters,
            config.cg_steps,
            config.pattern,
            seed=config.seed,
            **fit_weights(stats, config),
        )
        dtype = module.weight.dtype
        layer = DenseSparseLinear.from_dense_factors(
            factors.D.to(module.weight.device, dtype),
            factors.S.to(module.weight.device, dtype),
            shape.s,
            module.bias,
            config.pattern,
        )
        return Replacement(
            layer,
            {
                "rel_error": factors.final_error,
                "init_rel_error": factors.initial_error,
                "svd_rel_error": factors.svd_error,
            },
        )

    def summarise(self, result: StageResult, config: DSFormerConfig) -> None:
        summarise_factors(result, config.reduction)

    @contextlib.contextmanager
    def trainable(self, root: nn.Module, names: list[str], config: DSFormerConfig, training):
        """Straight-Through Factorizer: dense latents while training, compact (values, indices) again after."""
        for name in names:
            replace_module(root, name, STFDenseSparseLinear(root.get_submodule(name)))
        try:
            with super().trainable(root, names, config, training) as setup:
                yield setup
        finally:
            for name in names:
                module = root.get_submodule(name)
                if isinstance(module, STFDenseSparseLinear):
                    replace_module(root, name, module.to_compact().requires_grad_(False))
