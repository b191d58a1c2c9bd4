"""FFN matmul FLOPs per token (2 per multiply-add; activations, top-k and index shuffles not counted).

Dense gated FFN: gate, up and down are each hidden x intermediate. MoE: the shared and the top_k
chosen experts run (each a gated FFN of expert_size neurons) plus the router's hidden x experts
matmul. ``torch.utils.flop_counter`` counts the same quantities (a test checks it).
"""

from __future__ import annotations

from torch import nn

from ...modules.moe_ffn import MoEFeedForward


def dense_ffn_flops(hidden: int, intermediate: int) -> int:
    return 2 * 3 * hidden * intermediate


def moe_ffn_flops(hidden: int, expert_size: int, experts: int, top_k: int, shared: int = 0) -> int:
    return dense_ffn_flops(hidden, expert_size * (shared + top_k)) + 2 * hidden * experts


def ffn_flops_per_token(module: nn.Module) -> int:
    """FLOPs per token of a MoEFeedForward or a dense gated FFN (gate_proj/up_proj/down_proj)."""
    if isinstance(module, MoEFeedForward):
        return moe_ffn_flops(module.hidden_size, module.expert_size, module.experts, module.top_k, module.shared)
    return dense_ffn_flops(module.gate_proj.in_features, module.gate_proj.out_features)


def model_ffn_flops(model: nn.Module, pattern: str = r"re:.*\.mlp$") -> dict:
    """{"ffn_flops_per_token": sum over the model's FFNs, "ffn_flops_per_token_dense": the same if all were dense}."""
    from ...targets import select_modules

    total = dense = 0
    for module in select_modules(model, [pattern], where="ffn flops").values():
        total += ffn_flops_per_token(module)
        if isinstance(module, MoEFeedForward):
            dense += dense_ffn_flops(module.hidden_size, module.intermediate_size)
        else:
            dense += ffn_flops_per_token(module)
    return {"ffn_flops_per_token": total, "ffn_flops_per_token_dense": dense, "ffn_flops_ratio": total / dense}
