"""End-to-end PA training of the routers (and optionally the experts) with accelerate.

During training each MoEFeedForward is wrapped in ``PATrainingFFN``: it computes every expert
(dense cost: the pseudo-labels need them all), the teacher T (the frozen dense FFN when experts
train, else the exact sum of the unchanged experts), the PA labels, and the hard top-k output.
The total loss is lm * next-token CE + mean over layers of (distill * relative MSE(out, T) +
route * KL(router || labels) + balance * load balance). Attention, norms and embeddings stay
frozen. The same wrapper, without training, measures router/label agreement on any windows.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ...modules.moe_ffn import MoEFeedForward
from ...targets import replace_module
from .pa_loss import agreement, all_group_outputs, balance_loss, combine_scale, pseudo_labels, route_loss


class PATrainingFFN(nn.Module):
    """Training/measurement stand-in for a MoEFeedForward (same output, plus losses in ``self.last``).

    ``route_by="labels"`` routes by the pseudo-labels instead of the router (the oracle bound)."""

    def __init__(self, moe: MoEFeedForward, label_rule: str = "pa", teacher: bool = False, route_by: str = "router"):
        super().__init__()
        self.moe, self.label_rule, self.route_by = moe, label_rule, route_by
        self.has_teacher = teacher
        if teacher:  # the original dense FFN, frozen (the experts will drift away from it)
            gate, up, down = (w.detach().clone() for w in moe.to_dense())
            self.register_buffer("t_gate", gate, persistent=False)
            self.register_buffer("t_up", up, persistent=False)
            self.register_buffer("t_down", down, persistent=False)
        self.last: dict = {}
        self.totals = {"hits": 0.0, "exact": 0.0, "tokens": 0}

    def teacher_output(self, h: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        if not self.has_teacher:
            return groups.sum(1)
        return (self.moe.act_fn(h @ self.t_gate.T) * (h @ self.t_up.T)) @ self.t_down.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moe = self.moe
        shape = x.shape
        h = x.reshape(-1, moe.hidden_size)
        groups = all_group_outputs(moe, h)  # [N, G, d]
        shared = groups[:, : moe.shared].sum(1)
        routed = groups[:, moe.shared :]
        with torch.no_grad():
            teacher = self.teacher_output(h, groups.detach())
            labels = pseudo_labels(
                routed.detach(), teacher - shared.detach(), moe.top_k, self.label_rule, combine_scale(moe)
            )
        logits, chosen, weights = moe.route(h)
        if self.route_by == "labels":
            chosen = labels.float().topk(moe.top_k, dim=-1).indices
            weights = torch.full_like(weights, combine_scale(moe))
        mix = torch.zeros_like(logits).scatter(1, chosen, weights.to(logits.dtype))
        out = shared + torch.einsum("ne,ned->nd", mix.to(routed.dtype), routed)
        overlap, exact = agreement(logits.detach(), labels, moe.top_k)
        self.totals["hits"] += overlap * h.shape[0]
        self.totals["exact"] += exact * h.shape[0]
        self.totals["tokens"] += h.shape[0]
        self.last = {
            "distill": (out - teacher).pow(2).sum(-1).mean() / teacher.pow(2).sum(-1).mean().clamp_min(1e-12),
            "route": route_loss(logits, labels),
            "balance": balance_loss(logits, moe.top_k),
        }
        return out.reshape(shape)

    def agreement(self) -> tuple[float, float]:
        n = max(self.totals["tokens"], 1)
        return self.totals["hits"] / n, self.totals["exact"] / n


@contextlib.contextmanager
def pa_wrapped(
    model: nn.Module, names: list[str], label_rule: str = "pa", teacher: bool = False, route_by: str = "router"
):
    """Swap the named MoEFeedForwards for PATrainingFFN wrappers; restore them on exit."""
    wrappers = {}
    try:
        for name in names:
            wrappers[name] = PATrainingFFN(model.get_submodule(name), label_rule, teacher, route_by)
            replace_module(model, name, wrappers[name])
        yield wrappers
    finally:
        for name, wrapper in wrappers.items():
            replace_module(model, name, wrapper.moe)


def moe_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, MoEFeedForward)]


def measure_agreement(model: nn.Module, windows: torch.Tensor, label_rule: str = "pa", batch_size: int = 4) -> dict:
    """Router top-k vs PA labels on ``windows`` (e.g. held-out text): mean over layers, and per layer."""
    names = moe_names(model)
    device = next(model.parameters()).device
    with pa_wrapped(model, names, label_rule) as wrappers, torch.no_grad():
        for batch in windows.split(batch_size):
            model(input_ids=batch.to(device), use_cache=False)
        per_layer = {name: w.agreement() for name, w in wrappers.items()}
    moe = model.get_submodule(names[0])
    return {
        "agreement": sum(a for a, _ in per_layer.values()) / len(per_layer),
        "exact": sum(e for _, e in per_layer.values()) / len(per_layer),
        "chance": moe.top_k / moe.experts,
        "per_layer": per_layer,
    }


@contextlib.contextmanager
def pa_training(model: nn.Module, names: list[str], config, training):
    """The ``trainable`` hook of factorllm: PA wrappers on the MoE FFNs ``names``, router (and expert)
    parameter groups, and the PA loss (next-token CE + distill + route + balance), which also fills the
    per-step curves. Inside the block's ``inference_view()`` the real MoE modules are back in place."""
    from ..base import TrainingSetup

    train_experts = config.trainable == "router+experts"
    router_lr = config.router_lr or training.lr * 10
    series = {key: [] for key in ("lm_loss", "distill", "route", "balance", "agreement", "tokens")}
    with pa_wrapped(model, names, config.labels, teacher=train_experts) as wrappers:
        routers, experts = [], []
        for wrapper in wrappers.values():
            routers += list(wrapper.moe.router.parameters())
            if train_experts:
                experts += [wrapper.moe.w_gate, wrapper.moe.w_up, wrapper.moe.w_down]
        for p in routers + experts:
            p.requires_grad_(True)
        groups = [{"params": routers, "lr": router_lr}]
        if experts:
            groups.append({"params": experts, "lr": training.lr})

        def pa_loss(wrapped, batch):
            for wrapper in wrappers.values():
                wrapper.totals = {"hits": 0.0, "exact": 0.0, "tokens": 0}
            lm = wrapped(input_ids=batch, labels=batch, use_cache=False).loss
            parts = {
                key: torch.stack([w.last[key] for w in wrappers.values()]).mean()
                for key in ("distill", "route", "balance")
            }
            loss = (
                config.lm_loss_weight * lm
                + config.distill_loss_weight * parts["distill"]
                + config.route_loss_weight * parts["route"]
                + config.balance_loss_weight * parts["balance"]
            )
            agree = sum(w.agreement()[0] for w in wrappers.values()) / len(wrappers)
            for key, value in (("lm_loss", lm), *parts.items()):
                series[key].append(float(value.detach()))
            series["agreement"].append(agree)
            series["tokens"].append(series["tokens"][-1] + batch.numel() if series["tokens"] else batch.numel())
            return loss, {"agree": agree}

        @contextlib.contextmanager
        def inference_view():
            for name, wrapper in wrappers.items():
                replace_module(model, name, wrapper.moe)
            try:
                yield
            finally:
                for name, wrapper in wrappers.items():
                    replace_module(model, name, wrapper)

        setup = TrainingSetup(
            groups, pa_loss, series, {"trainable": config.trainable, "router_lr": router_lr}, inference_view
        )
        try:
            yield setup
        finally:
            setup.summary["final_train_agreement"] = series["agreement"][-1] if series["agreement"] else None
            model.requires_grad_(False)


def train_moe(model: nn.Module, config, windows: torch.Tensor, progress: bool = True, callback=None) -> dict:
    """Train the MoE FFNs of ``model`` as a factorllm stage with ``config.train`` would; returns summary and
    series. ``callback(step, tokens)`` (optional) runs after every step with the MoE modules in place (no
    wrappers), e.g. to measure a quality curve; its time is not counted in ``wall_time_s``."""
    from ...registry import get_method
    from ...training import train_globally

    return train_globally(
        model,
        get_method("factorllm"),
        config,
        config.train,
        moe_names(model),
        windows,
        progress=progress,
        on_step=callback,
    )
