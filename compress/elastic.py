"""Elastic rank: compress once, then serve or resize to any budget in the stored range, without data.

An elastic checkpoint (``lowrank`` with ``elastic:``) stores every targeted matrix's factors at the largest
rank any budget of its range uses, ordered by importance (every rank-r prefix is that layer's best rank-r
approximation under the stage's objective), with the estimated loss-against-rank curve of the sensitivity
allocation. A matrix that the smallest budget keeps dense stores its dense weight too, beside factors at its
largest rank that still saves parameters (larger budgets may factorise it). For a budget, the same allocation
runs again on those curves (restricted to the stored ranks, dense only where a dense weight is stored): the
budget of the compression itself is served exactly as a single-budget run would serve it.

Anchored checkpoints (``elastic.fit: anchored``) store further factor sets, each fit for the model compressed at
one of the calibrated budgets: a budget is served by the factors of the largest anchor budget at or below it (the
main factors below the first), so the budgets far from the compression's own are not served by factors fit for
another model's inputs.

* :func:`set_budget` switches a loaded model in place: each module selects a prefix of its factors or its
  dense weight (views of what is stored; nothing is copied, and switching back gives bit-identical outputs);
* :func:`resize` returns a model cut to a budget: factors cut to their ranks, dense weights dropped where
  that budget and every larger one factorise (a smaller checkpoint that still serves the larger budgets),
  or, with ``elastic=False``, the plain single-budget model (served-dense matrices back to ``nn.Linear``).

The reduction is the fraction of the targeted matrices' dense parameters removed, as everywhere else.
"""

from __future__ import annotations

import copy

from torch import nn

from .errors import CompressError
from .lowrank_math import allocate_ranks

ALLOCATION_TOLERANCE = 0.005  # allocate_ranks' default: the removed fraction lands in [r, r + this]


def elastic_modules(model: nn.Module) -> dict:
    """{name: LowRankLinear} of every module that carries a loss-against-rank curve."""
    from .modules import LowRankLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear) and m.curve_points}


def _dense_params(modules: dict) -> int:
    return sum(m.out_features * m.in_features for m in modules.values())


def _kept(module, selection) -> int:
    m, n = module.out_features, module.in_features
    return m * n if selection is None else _rank_of(selection) * (m + n)


def _rank_of(selection) -> int | None:
    """The rank of a module's selection (an int, ``(anchor, rank)``, or None: dense)."""
    return selection[1] if isinstance(selection, tuple) else selection


def anchor_for(modules: dict, reduction: float) -> int:
    """The factor set that serves ``reduction``: the last anchor whose budget is at or below it (0: the main
    factors). Every module of an elastic stage stores the same anchor budgets."""
    budgets = {tuple(m.anchor_budgets) for m in modules.values()}
    if len(budgets) > 1:
        raise CompressError(f"the elastic modules store different anchor budgets: {sorted(budgets)}")
    return sum(budget <= reduction + 1e-9 for budget in budgets.pop())


def reduction_at(modules: dict, ranks: dict) -> float:
    """The fraction of the modules' dense parameters removed at ``ranks`` (selections; None: served dense)."""
    return 1 - sum(_kept(m, ranks[name]) for name, m in modules.items()) / _dense_params(modules)


def _largest(modules: dict) -> dict[str, int | None]:
    """The most each module can serve: its dense weight if it stores one, else all its factors."""
    return {name: None if m.dense_weight is not None else m.rank for name, m in modules.items()}


def budget_range(model: nn.Module) -> tuple[float, float]:
    """(smallest, largest) reduction the model serves: the declared range of its elastic stage, within what the
    stored ranks allow (all stored / rank 1 everywhere)."""
    modules = _require_elastic(model)
    feasible = (reduction_at(modules, _largest(modules)), reduction_at(modules, {n: 1 for n in modules}))
    declared = _declared_range(model) or feasible
    return max(declared[0], feasible[0]), min(declared[1], feasible[1])


def ranks_for(model: nn.Module, reduction: float) -> dict:
    """The sensitivity allocation of ``reduction`` over the stored curves and ranks: each module's selection (a
    rank of the main factors, ``(anchor, rank)`` of an anchor's, None: serve dense)."""
    modules = _require_elastic(model)
    low, high = budget_range(model)
    # an allocation removes up to its tolerance more than asked: a model resized to r serves r itself
    if not low - ALLOCATION_TOLERANCE - 1e-9 <= reduction <= high + 1e-9:
        raise CompressError(
            f"reduction {reduction:.3f} is outside the range this elastic model serves ({low:.3f} .. {high:.3f})"
        )
    curves = {name: (m.out_features, m.in_features, m.curve()) for name, m in modules.items()}
    dense = {name for name, m in modules.items() if m.dense_weight is not None}
    anchor = anchor_for(modules, reduction)
    max_ranks = {name: m.anchor_rank(anchor) for name, m in modules.items()}
    try:
        ranks = allocate_ranks(curves, reduction, allow_dense=dense, max_ranks=max_ranks)
    except ValueError as exc:
        raise CompressError(f"elastic allocation for reduction {reduction:.3f}: {exc}") from None
    if anchor == 0:
        return ranks
    return {name: None if rank is None else (anchor, rank) for name, rank in ranks.items()}


def set_budget(model: nn.Module, reduction: float) -> dict:
    """Switch ``model`` to ``reduction`` in place (views, no copy); returns the selections (see ranks_for)."""
    ranks = ranks_for(model, reduction)
    select(model, ranks)
    return ranks


def selections(model: nn.Module) -> dict:
    """What each elastic module serves now: its rank (``(anchor, rank)`` for an anchor's), or None for its dense
    weight."""
    return {name: m.selection for name, m in elastic_modules(model).items()}


def select(model: nn.Module, ranks: dict) -> None:
    """Serve ``ranks`` (as :func:`ranks_for` or :func:`selections` give them)."""
    for name, module in elastic_modules(model).items():
        module.select(ranks[name])


def resize(model: nn.Module, reduction: float, inplace: bool = False, elastic: bool = True) -> nn.Module:
    """A model cut to ``reduction``.

    ``elastic=True``: each module's factors and curve are truncated to its rank there, and the dense weights
    of the modules that budget factorises are dropped; the result still serves every larger reduction (up to
    the range's end). ``elastic=False``: the single-budget model, as small as a fresh compression at that
    budget (served-dense modules become ``nn.Linear`` again, no curves). With ``inplace`` the model itself is
    changed; otherwise a copy is.
    """
    from .checkpoint import mark_compressed
    from .targets import replace_module

    ranks = ranks_for(model, reduction)
    anchor = anchor_for(elastic_modules(model), reduction)
    target = model if inplace else copy.deepcopy(model)
    for name, module in elastic_modules(target).items():
        if not elastic and ranks[name] is None:
            replace_module(target, name, _as_linear(module))
        elif not elastic:
            truncate(module, ranks[name], anchor)
            module.curve_points = 0
            del module.curve_ranks, module.curve_loss
            module.set_anchors([], [], [])
        else:
            truncate(module, ranks[name], anchor)
    previous = getattr(target.config, "quantization_config", None)
    mark_compressed(target, getattr(previous, "recipe", None))
    return target


def _as_linear(module) -> nn.Linear:
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    linear.to(module.dense_weight)
    linear.weight = module.dense_weight
    if module.bias is not None:
        linear.bias = module.bias
    return linear


def truncate(module, selection, anchor: int = 0) -> None:
    """Serve ``selection`` (of factor set ``anchor``) from now on, storing no more than that and the larger budgets
    need: the first ``rank`` components of that anchor's factors, which become the main ones (the anchors of
    larger budgets stay), the curve up to the largest rank still stored, no dense weight. A module served dense
    (None) keeps its dense weight and that anchor's factors whole (larger reductions may factorise it)."""
    import torch

    if selection is None and anchor == 0:
        module.select(None)
        return

    A, B = module.factors(anchor)
    rank = A.shape[1] if selection is None else _rank_of(selection)
    later = list(
        zip(module.anchor_budgets[anchor:], (module.anchor_A or [])[anchor:], (module.anchor_B or [])[anchor:])
    )
    curve_rank = max([rank, *(a.shape[1] for _, a, _ in later)])
    keep = module.curve_ranks <= curve_rank
    ranks, loss = module.curve_ranks[keep], module.curve_loss[keep]
    if int(ranks[-1]) != curve_rank:  # the curve must end at the largest rank stored: interpolate that point
        ranks = torch.cat([ranks, ranks.new_tensor([curve_rank])])
        loss = torch.cat([loss, module.curve()[curve_rank].to(loss).reshape(1)])
    module.A = nn.Parameter(A.detach()[:, :rank].clone(), requires_grad=A.requires_grad)
    module.B = nn.Parameter(B.detach()[:rank].clone(), requires_grad=B.requires_grad)
    module.rank = rank
    module.set_anchors(*[[item[i] for item in later] for i in range(3)])
    module.set_curve(ranks, loss)
    module.active_rank, module.active_anchor = None, 0
    if selection is None:
        module.select(None)
    else:
        module.dense_weight, module.dense_active = None, False


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
