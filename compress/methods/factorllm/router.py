"""Fit one layer's router on calibration activations against its PA pseudo-labels (cheap, layer-local).

Closed form first: ridge regression of the router's logits (with bias) onto the centred multi-hot
labels, i.e. a linear scorer whose top-k reproduces the labels where a linear map can. Then a few
epochs of the PA route loss (KL to the labels) plus load balance with Adam, started from that
solution. Labels come from the layer's own experts and the dense output T on the same tokens.
"""

from __future__ import annotations

import torch

from ...modules.moe_ffn import MoEFeedForward
from .pa_loss import agreement, all_group_outputs, balance_loss, combine_scale, pseudo_labels, route_loss


def layer_labels(
    module: MoEFeedForward, inputs: torch.Tensor, dense_out: torch.Tensor, rule: str, chunk: int = 2048
) -> torch.Tensor:
    """Pseudo-labels [N, E] for calibration tokens ``inputs`` [N, d] with dense FFN outputs ``dense_out``."""
    out = []
    scale = combine_scale(module)
    with torch.no_grad():
        for x, t in zip(inputs.split(chunk), dense_out.split(chunk)):
            groups = all_group_outputs(module, x)
            target = t.to(groups.dtype) - groups[:, : module.shared].sum(1)
            out.append(pseudo_labels(groups[:, module.shared :], target, module.top_k, rule, scale))
    return torch.cat(out)


def least_squares_router(inputs: torch.Tensor, labels: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [E, d], bias [E]) minimising ||[x, 1] W - (labels - k/E)||^2 + ridge * mean var(x) ||W||^2."""
    x = inputs.double()
    n, d = x.shape
    top_k = int(labels[0].sum())
    y = labels.double() - top_k / labels.shape[1]
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], dim=1)
    gram = xa.T @ xa / n
    reg = ridge * gram.diagonal()[:d].mean().clamp_min(1e-12)
    eye = torch.eye(d + 1, dtype=x.dtype, device=x.device)
    eye[d, d] = 0.0  # the bias is not shrunk
    solution = torch.linalg.solve(gram + reg * eye, xa.T @ y / n)
    return solution[:d].T.contiguous(), solution[d].contiguous()


def fit_router(module: MoEFeedForward, inputs: torch.Tensor, dense_out: torch.Tensor, config) -> dict:
    """Fit ``module.router`` in place (the refinement is kept only if it agrees better with the labels);
    returns agreement with the labels after least squares and at the end."""
    labels = layer_labels(module, inputs, dense_out, config.labels)
    weight, bias = least_squares_router(inputs, labels, config.ridge)
    router = module.router
    with torch.no_grad():
        router.weight.copy_(weight.to(router.weight))
        router.bias.copy_(bias.to(router.bias))
    x = inputs.to(router.weight)
    with torch.no_grad():
        ls_agree, ls_exact = agreement(router(x), labels, module.top_k)
    info = {
        "least_squares_agreement": ls_agree,
        "least_squares_exact": ls_exact,
        "label_load_max": float(labels.float().mean(0).max() / (module.top_k / module.experts)),
    }
    if config.router_fit_epochs:
        router.requires_grad_(True)
        optimizer = torch.optim.Adam(router.parameters(), lr=config.router_fit_lr)
        gen = torch.Generator().manual_seed(config.seed)
        batch = 2048
        with torch.enable_grad():
            for _ in range(config.router_fit_epochs):
                for idx in torch.randperm(x.shape[0], generator=gen).split(batch):
                    logits = router(x[idx])
                    loss = route_loss(logits, labels[idx]) + config.balance_loss_weight * balance_loss(
                        logits, module.top_k
                    )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        router.requires_grad_(False)
        with torch.no_grad():
            if agreement(router(x), labels, module.top_k)[0] < ls_agree:  # keep the better of the two fits
                router.weight.copy_(weight.to(router.weight))
                router.bias.copy_(bias.to(router.bias))
    with torch.no_grad():
        logits = router(x)
        info["agreement"], info["exact"] = agreement(logits, labels, module.top_k)
        info["route_loss"] = float(route_loss(logits, labels))
    return info
