"""The one module-targeting helper every method uses.

Grammar (as llm-compressor / torchao): a target is either a module class name
(``"Linear"``, ``"LowRankLinear"``) or ``"re:<regex>"`` matched with ``re.fullmatch``
against the module's dotted name. ``ignore`` uses the same grammar and wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .errors import CompressError

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def _matches(name: str, module: nn.Module, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return type(module).__name__ == pattern


def check_patterns(patterns: Iterable[str]) -> list[str]:
    """Validate regex syntax; returns error messages (used by recipe validation)."""
    errors = []
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                errors.append(f"invalid regex {pattern!r}: {exc}")
        elif not pattern.isidentifier():
            errors.append(f"{pattern!r} is neither a class name nor a 're:<regex>' pattern")
    return errors


def select_modules(
    model: nn.Module, targets: Iterable[str], ignore: Iterable[str] = (), where: str = "targets"
) -> dict[str, nn.Module]:
    """Return {dotted name: module} for every module matching a target and no ignore pattern.

    Order is the model's own (decoder layers ascending). Zero matches is an error,
    as is an ignore pattern that matches nothing (it is almost always a typo).
    """
    targets, ignore = list(targets), list(ignore)
    selected: dict[str, nn.Module] = {}
    ignored_hits = {pattern: 0 for pattern in ignore}
    for name, module in model.named_modules():
        if not name or not any(_matches(name, module, t) for t in targets):
            continue
        hit = [p for p in ignore if _matches(name, module, p)]
        for pattern in hit:
            ignored_hits[pattern] += 1
        if not hit:
            selected[name] = module
    if not selected:
        raise CompressError(
            f"{where}: {targets} matched no module of the model" + (f" (after ignore {ignore})" if ignore else "")
        )
    unused = [p for p, n in ignored_hits.items() if n == 0]
    if unused:
        raise CompressError(f"{where}: ignore pattern(s) {unused} matched no targeted module")
    return selected


def layer_index(name: str) -> int | None:
    """Decoder-layer index of a module name like ``model.layers.7.mlp.up_proj`` (None outside layers)."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
