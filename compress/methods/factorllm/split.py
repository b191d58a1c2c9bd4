"""Turn one dense gated FFN into a MoEFeedForward (weights reused, nothing retrained here)."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import CompressError
from ...modules.moe_ffn import MoEFeedForward, resolve_activation
from .partition import cluster_partition, contiguous_partition, expert_size, neuron_activations, random_partition


def dense_ffn(name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(gate [I, d], up [I, d], down [d, I], activation name) of a bias-free gated FFN, or a CompressError."""
    parts = [getattr(module, attr, None) for attr in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in parts) or not hasattr(module, "act_fn"):
        raise CompressError(
            f"factorllm: {name} ({type(module).__name__}) is not a gated FFN with "
            "gate_proj/up_proj/down_proj Linears and act_fn"
        )
    gate, up, down = parts
    if any(p.bias is not None for p in parts):
        raise CompressError(f"factorllm: {name} has biases; only bias-free gated FFNs are supported")
    config = getattr(module, "config", None)
    activation = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    if activation is None:
        raise CompressError(f"factorllm: cannot tell the activation of {name} (no config.hidden_act)")
    try:
        same = type(resolve_activation(activation)) is type(module.act_fn)
    except ValueError:
        same = False
    if not same:
        raise CompressError(
            f"factorllm: {name}'s act_fn is {type(module.act_fn).__name__}, not config's {activation!r}"
        )
    return gate.weight, up.weight, down.weight, activation


def make_groups(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn, config, inputs: torch.Tensor | None
) -> torch.Tensor:
    """Neuron groups [shared + experts, m] by ``config.partition`` (``inputs`` [N, d]: calibration tokens)."""
    intermediate = gate.shape[0]
    experts, shared = config.experts, config.shared_experts
    expert_size(intermediate, experts, shared)  # clear error before any work
    if config.partition == "contiguous":
        return contiguous_partition(intermediate, experts, shared)
    if config.partition == "random":
        return random_partition(intermediate, experts, shared, seed=config.seed)
    with torch.no_grad():
        if config.cluster_on == "activations":
            if inputs is None:
                raise CompressError("factorllm: partition 'cluster' on activations needs calibration windows")
            gen = torch.Generator().manual_seed(config.seed)
            sample = inputs[torch.randperm(inputs.shape[0], generator=gen)[: config.cluster_tokens]]
            acts = neuron_activations(gate, up, act_fn, sample.to(gate.device)).float().cpu()
            features, importance = acts.T, acts.mean(0)
        else:
            features = torch.cat([gate, up], dim=1).float().cpu()
            importance = (gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)).float().cpu()
    return cluster_partition(features, experts, shared, importance, config.cluster_iters, config.seed)


def split_ffn(name: str, module: nn.Module, config, inputs: torch.Tensor | None = None) -> MoEFeedForward:
    """The MoE twin of a dense FFN: with every expert active it computes the same function."""
    gate, up, down, activation = dense_ffn(name, module)
    groups = make_groups(gate, up, down, module.act_fn, config, inputs)
    torch.manual_seed(config.seed)  # the (untrained) router's default init is reproducible
    moe = MoEFeedForward.from_dense(
        gate.detach(),
        up.detach(),
        down.detach(),
        groups,
        config.experts,
        config.top_k,
        config.shared_experts,
        config.combine,
        activation,
    )
    return moe.requires_grad_(False)
