"""FactorLLM: dense FFN -> experts (same weights) + PA-trained router, top-k experts per token.

A layer method: each FFN is split with its router fitted on the FFN's own calibration inputs and
outputs (``io`` statistics), layer by layer, so layer i's router sees the already-split layers < i.
The optional end-to-end training (``train``) is the pipeline's global training with this method's
``trainable`` hook (PA wrappers, router and expert parameter groups, the PA loss).
"""

from __future__ import annotations

import contextlib

from torch import nn

from ...registry import register_method
from ..base import Calibration, Method, Plan, Replacement, StageResult
from .config import FactorLLMConfig
from .flops import dense_ffn_flops, ffn_flops_per_token
from .partition import expert_size
from .router import fit_router
from .split import dense_ffn, split_ffn


def needs_calibration(config: FactorLLMConfig) -> bool:
    return config.router_fit != "none" or (config.partition == "cluster" and config.cluster_on == "activations")


@register_method
class FactorLLM(Method):
    name = "factorllm"
    config_class = FactorLLMConfig
    summary = "FactorLLM: FFN -> experts reusing its weights + PA-trained router, top-k experts per token"

    def calibration(self, config: FactorLLMConfig) -> Calibration:
        if not needs_calibration(config):
            return Calibration()
        return Calibration(statistics="io", windows=config.router_fit_windows, batch_size=config.calibration_batch_size)

    def plan(self, modules: dict[str, nn.Module], config: FactorLLMConfig, planner) -> Plan:
        """Every target is a supported gated FFN whose neurons split into equal experts (before any work)."""
        for name, module in modules.items():
            gate, _, _, _ = dense_ffn(name, module)
            expert_size(gate.shape[0], config.experts, config.shared_experts)
        return Plan({name: True for name in modules}, StageResult(self.name, rows=[{"module": n} for n in modules]))

    def apply(self, name, module: nn.Module, config: FactorLLMConfig, decision, stats) -> Replacement:
        inputs, outputs = (stats["inputs"], stats["outputs"]) if stats is not None else (None, None)
        moe = split_ffn(name, module, config, inputs)
        info = {
            "experts": config.experts,
            "top_k": config.top_k,
            "shared": config.shared_experts,
            "expert_size": moe.expert_size,
            "params_before": sum(p.numel() for p in module.parameters()),
            "params_after": sum(p.numel() for p in moe.parameters()),
            "flops_dense": dense_ffn_flops(moe.hidden_size, moe.intermediate_size),
            "flops_moe": ffn_flops_per_token(moe),
        }
        if config.router_fit != "none":
            info.update(fit_router(moe, inputs, outputs, config))
        return Replacement(moe, info)

    def summarise(self, result: StageResult, config: FactorLLMConfig) -> None:
        rows = result.rows
        dense = sum(r["flops_dense"] for r in rows)
        moe = sum(r["flops_moe"] for r in rows)
        result.summary.update(
            {
                "experts": config.experts,
                "top_k": config.top_k,
                "shared_experts": config.shared_experts,
                "partition": config.partition,
                "combine": config.combine,
                "labels": config.labels,
                "ffns": len(rows),
                "ffn_flops_per_token_dense": dense,
                "ffn_flops_per_token_moe": moe,
                "ffn_flops_ratio": moe / dense,
                # the split keeps every weight and adds routers: nothing is removed (the saving is compute)
                "targeted_params_before": sum(r["params_before"] for r in rows),
                "targeted_params_after": sum(r["params_after"] for r in rows),
            }
        )
        fitted = [r for r in rows if "agreement" in r]
        if fitted:
            result.summary["router_fit_agreement"] = sum(r["agreement"] for r in fitted) / len(fitted)
            result.summary["agreement_chance"] = config.top_k / config.experts

    @contextlib.contextmanager
    def trainable(self, root: nn.Module, names: list[str], config: FactorLLMConfig, training):
        from .train import pa_training

        with pa_training(root, names, config, training) as setup:
            yield setup
