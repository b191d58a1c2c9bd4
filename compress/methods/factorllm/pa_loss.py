"""FactorLLM's Prior-Approximate (PA) loss: pseudo-labels from the dense FFN, router KL, load balance.

The teacher T is the dense FFN output for the same input. Each routed expert E_i(x) is compared
with what it should contribute; the ``top_k`` best experts are the token's pseudo-label, and the
router is pulled towards them by KL(softmax(router logits) || softmax(multi-hot label)), exactly
the direction and target of the released code, whose route term however is commented out and
whose hard top-k passes no gradient. Here the route term is always on, so the router learns.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ...modules.moe_ffn import MoEFeedForward


def all_group_outputs(module: MoEFeedForward, h: torch.Tensor) -> torch.Tensor:
    """Every group's (shared and routed) output for every token: [N, groups, d] (dense cost)."""
    h = h.to(module.w_gate.dtype)
    a = module.act_fn(torch.einsum("nd,gmd->ngm", h, module.w_gate)) * torch.einsum("nd,gmd->ngm", h, module.w_up)
    return torch.einsum("ngm,gdm->ngd", a, module.w_down)


def combine_scale(module: MoEFeedForward) -> float:
    """What the chosen experts' plain sum is multiplied by (equal router scores for ``weights``)."""
    return module.experts / module.top_k if module.combine == "scale" else 1.0


def pa_errors(routed: torch.Tensor, target: torch.Tensor, top_k: int) -> torch.Tensor:
    """FactorLLM's per-expert error MSE(E_i(x), T k/E): [N, E] from routed outputs [N, E, d], target [N, d]."""
    share = target * (top_k / routed.shape[1])
    return (routed - share.unsqueeze(1)).pow(2).mean(-1)


def subsets(experts: int, top_k: int) -> torch.Tensor:
    """All top_k-subsets of the experts as a multi-hot [C, E] matrix."""
    combos = list(itertools.combinations(range(experts), top_k))
    mask = torch.zeros(len(combos), experts)
    for row, combo in enumerate(combos):
        mask[row, list(combo)] = 1.0
    return mask


def best_subset_errors(routed: torch.Tensor, target: torch.Tensor, top_k: int, scale: float = 1.0):
    """||T - scale * sum_{i in S} E_i||^2 for every top_k-subset S: ([N, C], subsets [C, E]).

    Uses the Gram matrix of the expert outputs, so no subset sum is ever materialised."""
    routed64, target64 = routed.double(), target.double()
    gram = torch.einsum("ned,nfd->nef", routed64, routed64)  # [N, E, E]
    cross = torch.einsum("ned,nd->ne", routed64, target64)  # [N, E]
    mask = subsets(routed.shape[1], top_k).to(routed64)  # [C, E]
    quad = torch.einsum("ce,nef,cf->nc", mask, gram, mask)
    err = target64.pow(2).sum(-1, keepdim=True) - 2 * scale * cross @ mask.T + scale**2 * quad
    return err, mask


def pseudo_labels(
    routed: torch.Tensor, target: torch.Tensor, top_k: int, rule: str = "pa", scale: float = 1.0
) -> torch.Tensor:
    """Multi-hot [N, E] (bool) of the top_k experts a token should use.

    ``routed`` [N, E, d]: the routed experts' outputs; ``target`` [N, d]: the dense FFN output minus
    the shared experts' output (what the routed experts must supply)."""
    if rule == "pa":
        chosen = pa_errors(routed, target, top_k).topk(top_k, dim=-1, largest=False).indices
        return torch.zeros(routed.shape[:2], dtype=torch.bool, device=routed.device).scatter_(1, chosen, True)
    if rule == "best_subset":
        err, mask = best_subset_errors(routed, target, top_k, scale)
        return mask[err.argmin(-1)].bool()
    raise ValueError(f"unknown label rule {rule!r}")


def route_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(softmax(logits) || softmax(labels as 0/1 scores))."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_q = F.log_softmax(labels.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def balance_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer load balance E * sum_e f_e P_e (1 when perfectly balanced).

    f_e: fraction of (token, slot) pairs routed to expert e (no gradient); P_e: mean router probability."""
    experts = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = logits.topk(top_k, dim=-1).indices
    load = (
        torch.zeros(experts, device=logits.device).index_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), device=logits.device)
        )
        / chosen.numel()
    )
    return experts * (load * probs.mean(0)).sum()


def agreement(logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> tuple[float, float]:
    """(mean |router top-k ∩ label| / k, fraction of tokens with the identical set). Chance: k/E and 1/C(E,k)."""
    chosen = torch.zeros_like(labels).scatter_(1, logits.topk(top_k, dim=-1).indices, True)
    hits = (chosen & labels).sum(-1).float()
    return float(hits.mean() / top_k), float((hits == top_k).float().mean())
