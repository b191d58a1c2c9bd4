"""FactorLLM: dense FFN -> experts (same weights) + PA-trained router, top-k experts per token.

A *model* method: the split is layer-sequential (layer i's router is fitted on the activations the
already-split layers < i produce, through the shared engine in ``compress.activations``), and the
optional end-to-end training needs the whole model afterwards.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ...errors import CompressError
from ...registry import register_method
from ...targets import replace_module, select_modules
from ..base import ModelMethod, StageResult
from .config import FactorLLMConfig
from .flops import dense_ffn_flops, ffn_flops_per_token
from .partition import expert_size
from .router import fit_router
from .split import dense_ffn, split_ffn


def _capture_ffn_io(modules: dict[str, nn.Module]):
    """Forward hooks that keep each FFN's input and output tokens ([N, d] each) until taken."""
    store = {name: ([], []) for name in modules}

    def hook(name):
        def keep(module, args, output):
            d = args[0].shape[-1]
            store[name][0].append(args[0].detach().reshape(-1, d))
            store[name][1].append(output.detach().reshape(-1, d))
        return keep

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]

    def take(name):
        inputs, outputs = store.pop(name)
        return torch.cat(inputs), torch.cat(outputs)

    return handles, take


def needs_calibration(config: FactorLLMConfig) -> bool:
    return config.router_fit != "none" or (config.partition == "cluster" and config.cluster_on == "activations")


@register_method
class FactorLLM(ModelMethod):
    name = "factorllm"
    config_class = FactorLLMConfig
    summary = "FactorLLM: FFN -> experts reusing its weights + PA-trained router, top-k experts per token"

    def check(self, modules: dict[str, nn.Module], config: FactorLLMConfig) -> None:
        """Every target is a supported gated FFN whose neurons split into equal experts (before any work)."""
        for name, module in modules.items():
            gate, _, _, _ = dense_ffn(name, module)
            expert_size(gate.shape[0], config.experts, config.shared_experts)

    def run(self, model: nn.Module, config: FactorLLMConfig, ctx) -> StageResult:
        modules = select_modules(model, config.targets, config.ignore, "factorllm.targets")
        self.check(modules, config)
        result = StageResult(self.name)
        rows: dict[str, dict] = {}
        start = time.perf_counter()

        def replace(name, module, inputs=None, outputs=None):
            moe = split_ffn(name, module, config, inputs)
            row = {"module": name, "experts": config.experts, "top_k": config.top_k,
                   "shared": config.shared_experts, "expert_size": moe.expert_size,
                   "params_before": sum(p.numel() for p in module.parameters()),
                   "params_after": sum(p.numel() for p in moe.parameters()),
                   "flops_dense": dense_ffn_flops(moe.hidden_size, moe.intermediate_size),
                   "flops_moe": ffn_flops_per_token(moe)}
            if config.router_fit != "none":
                row.update(fit_router(moe, inputs, outputs, config))
            rows[name] = row
            replace_module(model, name, moe)

        if needs_calibration(config):
            from ...activations import calibrate_sequentially

            windows = ctx.calibration_windows()
            if windows is None:
                raise CompressError("factorllm: router fitting / activation clustering needs calibration windows")
            handles, take = _capture_ffn_io(modules)
            try:
                def on_layer(index, layer_modules, stats):
                    for name, module in layer_modules.items():
                        replace(name, module, *take(name))

                report = calibrate_sequentially(model, modules, windows[: config.router_fit_windows], on_layer,
                                                batch_size=config.calibration_batch_size)
            finally:
                for handle in handles:
                    handle.remove()
            result.summary["calibration"] = {"layers": report.layers_calibrated, "tokens": report.tokens}
        else:
            for name, module in modules.items():
                replace(name, module)
        result.summary["split_wall_time_s"] = time.perf_counter() - start
        result.rows = [rows[name] for name in modules]
        self.summarise(result, config)
        if config.train != "none":
            from .train import train_moe

            trained = train_moe(model, config, ctx.calibration_windows(), ctx.progress)
            result.summary["training"] = trained["summary"]
            result.series.update(trained["series"])
        return result

    @staticmethod
    def summarise(result: StageResult, config: FactorLLMConfig) -> None:
        rows = result.rows
        dense = sum(r["flops_dense"] for r in rows)
        moe = sum(r["flops_moe"] for r in rows)
        result.summary.update({
            "experts": config.experts, "top_k": config.top_k, "shared_experts": config.shared_experts,
            "partition": config.partition, "combine": config.combine, "labels": config.labels,
            "ffns": len(rows), "ffn_flops_per_token_dense": dense, "ffn_flops_per_token_moe": moe,
            "ffn_flops_ratio": moe / dense,
            # the split keeps every weight and adds routers: nothing is removed (the saving is compute)
            "targeted_params_before": sum(r["params_before"] for r in rows),
            "targeted_params_after": sum(r["params_after"] for r in rows),
        })
        fitted = [r for r in rows if "agreement" in r]
        if fitted:
            result.summary["router_fit_agreement"] = sum(r["agreement"] for r in fitted) / len(fitted)
            result.summary["agreement_chance"] = config.top_k / config.experts
