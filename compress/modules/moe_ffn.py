"""MoEFeedForward: a dense gated FFN split into experts that reuse its weights (FactorLLM).

The intermediate neurons of ``down(act(gate x) * up x)`` are partitioned into ``shared + experts``
equal groups; group g keeps gate/up rows and down columns ``neurons[g]``. Because the FFN is a sum
over neurons, the dense output is exactly the sum of all groups' outputs. A linear router picks
the ``top_k`` routed experts per token; shared groups always run.

Inference really skips the other experts: tokens are grouped per expert (``index_select`` the
tokens routed to expert e, run its small FFN, ``index_add_`` the result back), so the FFN costs
(shared + top_k) / (shared + experts) of the dense one per token, plus the router.

``combine`` says how the chosen experts' outputs are added up:
``sum`` (plain partial sum of the dense FFN), ``scale`` (partial sum times experts / top_k,
FactorLLM's choice) or ``weights`` (each chosen expert weighted by top_k * softmax over the
chosen router logits: equal scores give the plain sum, and the router gets a gradient).
"""

from __future__ import annotations

import torch
from torch import nn

COMBINES = ("sum", "scale", "weights")


def resolve_activation(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"unknown activation {name!r}")
    return ACT2FN[name]


class MoEFeedForward(nn.Module):
    """``shared`` always-on groups plus ``experts`` routed groups of ``expert_size`` neurons each.

    Weights are stacked per group: ``w_gate``/``w_up`` [G, expert_size, hidden], ``w_down``
    [G, hidden, expert_size], groups 0..shared-1 shared, the rest routed. ``neurons`` [G, expert_size]
    records which neuron of the dense FFN each row came from (``to_dense`` rebuilds it).
    """

    spec_type = "moe_ffn"
    adapter_parameters = ("w_gate", "w_up", "w_down")  # [experts, rows, cols]: one adapter per expert

    def __init__(
        self,
        hidden_size: int,
        expert_size: int,
        experts: int,
        top_k: int,
        shared: int = 0,
        combine: str = "sum",
        activation: str = "silu",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if experts < 1 or not 1 <= top_k <= experts:
            raise ValueError(f"need 1 <= top_k <= experts, got top_k={top_k}, experts={experts}")
        if shared < 0 or expert_size < 1:
            raise ValueError(f"bad shape: shared={shared}, expert_size={expert_size}")
        if combine not in COMBINES:
            raise ValueError(f"combine {combine!r} is not one of {COMBINES}")
        self.hidden_size, self.expert_size = hidden_size, expert_size
        self.experts, self.top_k, self.shared, self.combine = experts, top_k, shared, combine
        self.activation = activation
        self.act_fn = resolve_activation(activation)
        groups = shared + experts
        factory = {"dtype": dtype, "device": device}
        self.w_gate = nn.Parameter(torch.empty(groups, expert_size, hidden_size, **factory))
        self.w_up = nn.Parameter(torch.empty(groups, expert_size, hidden_size, **factory))
        self.w_down = nn.Parameter(torch.empty(groups, hidden_size, expert_size, **factory))
        self.router = nn.Linear(hidden_size, experts, bias=True, **factory)
        neurons = torch.arange(groups * expert_size, device=device, dtype=torch.int32).reshape(groups, expert_size)
        self.register_buffer("neurons", neurons)

    @property
    def groups(self) -> int:
        return self.shared + self.experts

    @property
    def intermediate_size(self) -> int:
        return self.groups * self.expert_size

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(
        cls,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        groups: torch.Tensor,
        experts: int,
        top_k: int,
        shared: int = 0,
        combine: str = "sum",
        activation: str = "silu",
    ) -> MoEFeedForward:
        """Split dense weights (gate/up [I, d], down [d, I]) by ``groups`` [shared + experts, m] neuron ids.

        The router starts as nn.Linear's default random init; ``router.fit_router`` trains it."""
        m = groups.shape[1]
        layer = cls(gate.shape[1], m, experts, top_k, shared, combine, activation, dtype=gate.dtype, device=gate.device)
        idx = groups.to(gate.device, torch.long)
        with torch.no_grad():
            layer.w_gate.copy_(gate[idx])
            layer.w_up.copy_(up[idx])
            layer.w_down.copy_(down[:, idx].permute(1, 0, 2))
            layer.neurons.copy_(groups.to(torch.int32))
        return layer

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [I, d], up [I, d], down [d, I]) of the dense FFN in original neuron order."""
        order = self.neurons.reshape(-1).long().argsort()
        gate = self.w_gate.reshape(-1, self.hidden_size)[order]
        up = self.w_up.reshape(-1, self.hidden_size)[order]
        down = self.w_down.permute(1, 0, 2).reshape(self.hidden_size, -1)[:, order]
        return gate, up, down

    # -- checkpoint spec: enough to rebuild the empty module before weights load --
    def spec(self) -> dict:
        return {
            "type": self.spec_type,
            "hidden_size": self.hidden_size,
            "expert_size": self.expert_size,
            "experts": self.experts,
            "top_k": self.top_k,
            "shared": self.shared,
            "combine": self.combine,
            "activation": self.activation,
        }

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype | None = None, device=None) -> MoEFeedForward:
        return cls(
            spec["hidden_size"],
            spec["expert_size"],
            spec["experts"],
            spec["top_k"],
            spec["shared"],
            spec["combine"],
            spec["activation"],
            dtype=dtype,
            device=device,
        )

    # ------------------------------------------------------------------ routing
    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [N, E], chosen experts [N, k] and their combine weights [N, k]."""
        logits = self.router(h)
        top, chosen = logits.topk(self.top_k, dim=-1)
        if self.combine == "weights":
            weights = self.top_k * torch.softmax(top, dim=-1)
        elif self.combine == "scale":
            weights = torch.full_like(top, self.experts / self.top_k)
        else:
            weights = torch.ones_like(top)
        return logits, chosen, weights

    def expert(self, h: torch.Tensor, group: int) -> torch.Tensor:
        """Output of one group (shared or routed) for the tokens ``h`` [n, d]."""
        a = self.act_fn(h @ self.w_gate[group].T) * (h @ self.w_up[group].T)
        return a @ self.w_down[group].T

    def shared_output(self, h: torch.Tensor) -> torch.Tensor:
        """All shared groups at once (one matmul chain over their concatenated neurons)."""
        s, d = self.shared, self.hidden_size
        gate = self.w_gate[:s].reshape(-1, d)
        up = self.w_up[:s].reshape(-1, d)
        down = self.w_down[:s].permute(1, 0, 2).reshape(d, -1)
        return (self.act_fn(h @ gate.T) * (h @ up.T)) @ down.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, self.hidden_size)
        out = self.shared_output(h) if self.shared else torch.zeros_like(h)
        _, chosen, weights = self.route(h)
        for e in range(self.experts):
            tokens, slot = (chosen == e).nonzero(as_tuple=True)
            if tokens.numel() == 0:
                continue
            y = self.expert(h.index_select(0, tokens), self.shared + e)
            if self.combine != "sum":
                y = y * weights[tokens, slot].unsqueeze(-1)
            out.index_add_(0, tokens, y)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, expert_size={self.expert_size}, experts={self.experts}, "
            f"top_k={self.top_k}, shared={self.shared}, combine={self.combine}, activation={self.activation}"
        )
