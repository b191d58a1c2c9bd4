"""Elastic rank: compress once, then serve or resize to any budget in the stored range, without data.

An elastic checkpoint (``lowrank`` with ``elastic:``) stores every targeted matrix's factors at the largest
rank any budget of its range uses, ordered by importance (every rank-r prefix is that layer's best rank-r
approximation under the stage's objective), with the estimated loss-against-rank curve of the sensitivity
allocation. For a budget, the same allocation runs again on those curves (restricted to the stored ranks):

* :func:`set_budget` switches a loaded model in place: each module's ``active_rank`` selects a prefix
  (views of the stored factors; nothing is copied, and switching back gives bit-identical outputs);
* :func:`resize` returns a model whose factors are cut to those ranks (a smaller checkpoint).

The reduction is the fraction of the targeted matrices' dense parameters removed, as everywhere else.
"""

from __future__ import annotations

import copy

from torch import nn

from .errors import CompressError
from .lowrank_math import allocate_ranks


def elastic_modules(model: nn.Module) -> dict:
    """{name: LowRankLinear} of every module that carries a loss-against-rank curve."""
    from .modules import LowRankLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear) and m.curve_points}


def _dense_params(modules: dict) -> int:
    return sum(m.out_features * m.in_features for m in modules.values())


def reduction_at(modules: dict, ranks: dict[str, int]) -> float:
    """The fraction of the modules' dense parameters removed at ``ranks``."""
    kept = sum(ranks[name] * (m.out_features + m.in_features) for name, m in modules.items())
    return 1 - kept / _dense_params(modules)


def budget_range(model: nn.Module) -> tuple[float, float]:
    """(smallest, largest) reduction the model serves: the declared range of its elastic stage, within what the
    stored ranks allow (all stored / rank 1 everywhere)."""
    modules = _require_elastic(model)
    feasible = (
        reduction_at(modules, {n: m.rank for n, m in modules.items()}),
        reduction_at(modules, {n: 1 for n in modules}),
    )
    declared = _declared_range(model) or feasible
    return max(declared[0], feasible[0]), min(declared[1], feasible[1])


def ranks_for(model: nn.Module, reduction: float) -> dict[str, int]:
    """The sensitivity allocation of ``reduction`` over the stored curves and ranks."""
    modules = _require_elastic(model)
    low, high = budget_range(model)
    if not low - 1e-9 <= reduction <= high + 1e-9:
        raise CompressError(
            f"reduction {reduction:.3f} is outside the range this elastic model serves ({low:.3f} .. {high:.3f})"
        )
    curves = {name: (m.out_features, m.in_features, m.curve()) for name, m in modules.items()}
    try:
        return allocate_ranks(curves, reduction, allow_dense=False, max_ranks={n: m.rank for n, m in modules.items()})
    except ValueError as exc:
        raise CompressError(f"elastic allocation for reduction {reduction:.3f}: {exc}") from None


def set_budget(model: nn.Module, reduction: float) -> dict[str, int]:
    """Switch ``model`` to ``reduction`` in place (active ranks: views, no copy); returns the ranks."""
    ranks = ranks_for(model, reduction)
    for name, module in elastic_modules(model).items():
        module.active_rank = ranks[name]
    return ranks


def resize(model: nn.Module, reduction: float, inplace: bool = False) -> nn.Module:
    """A model cut to ``reduction``: each elastic module's factors and curve truncated to its rank there.

    The result stays elastic for every smaller budget (down to the range's end). With ``inplace`` the
    model itself is changed; otherwise a copy is.
    """
    from .checkpoint import mark_compressed

    ranks = ranks_for(model, reduction)
    target = model if inplace else copy.deepcopy(model)
    for name, module in elastic_modules(target).items():
        truncate(module, ranks[name])
    previous = getattr(target.config, "quantization_config", None)
    mark_compressed(target, getattr(previous, "recipe", None))
    return target


def truncate(module, rank: int) -> None:
    """Keep the first ``rank`` components of an elastic LowRankLinear (and its curve up to that rank)."""
    import torch

    keep = module.curve_ranks <= rank
    ranks, loss = module.curve_ranks[keep], module.curve_loss[keep]
    if int(ranks[-1]) != rank:  # the curve must end at the new rank: interpolate that point
        ranks = torch.cat([ranks, ranks.new_tensor([rank])])
        loss = torch.cat([loss, module.curve()[rank].to(loss).reshape(1)])
    module.A = nn.Parameter(module.A.detach()[:, :rank].clone(), requires_grad=module.A.requires_grad)
    module.B = nn.Parameter(module.B.detach()[:rank].clone(), requires_grad=module.B.requires_grad)
    module.rank = rank
    module.set_curve(ranks, loss)
    module.active_rank = None


def _require_elastic(model: nn.Module) -> dict:
    modules = elastic_modules(model)
    if not modules:
        raise CompressError(
            "the model has no elastic low-rank modules (compress it with a lowrank stage that has an `elastic:` range)"
        )
    return modules


def _declared_range(model: nn.Module) -> tuple[float, float] | None:
    section = getattr(getattr(model, "config", None), "quantization_config", None)
    recipe = (section.get("recipe") if isinstance(section, dict) else getattr(section, "recipe", None)) or {}
    for stage in recipe.get("stages", []):
        elastic = stage.get("elastic") if isinstance(stage, dict) else None
        if elastic and "min_reduction" in elastic:  # a lowrank stage's (a finetune stage's lists budgets)
            return elastic["min_reduction"], elastic["max_reduction"]
    return None
