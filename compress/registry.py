"""METHODS: method name -> method object (its config class rides along).

Built-in methods are listed explicitly below (no module scanning); third parties call
``register_method``. Names collide loudly; unknown names get a "did you mean".
"""

from __future__ import annotations

import difflib
import importlib

from .errors import CompressError

# name -> module that defines (and registers) it. Imported on first use.
_BUILTIN = {
    "welore": "compress.methods.welore",
    "lowrank": "compress.methods.lowrank",
    "lowrank_attention": "compress.methods.lowrank_attention",
    "finetune": "compress.methods.finetune",
    "dsformer": "compress.methods.dsformer",
    "lost": "compress.methods.lost",
    "ofa_embedding": "compress.methods.ofa",
    "extend_vocab": "compress.methods.ofa",
    "factorllm": "compress.methods.factorllm",
}

METHODS: dict = {}
_loaded = False


def register_method(method_cls):
    """Class decorator: register a :class:`compress.methods.base.Method` subclass under ``method_cls.name``."""
    from .methods.base import Method

    if not (isinstance(method_cls, type) and issubclass(method_cls, Method)):
        raise TypeError(f"{method_cls!r} is not a compress.methods.base.Method subclass")
    if method_cls.level not in ("layers", "model", "training"):
        raise ValueError(f"method {method_cls.name!r}: level must be 'layers', 'model' or 'training'")
    name = method_cls.name
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered by {type(METHODS[name]).__module__}")
    METHODS[name] = method_cls()
    return method_cls


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN.values():
            importlib.import_module(module)


def all_methods() -> dict:
    _load_builtins()
    return dict(METHODS)


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get_method(name: str):
    methods = all_methods()
    if name not in methods:
        raise CompressError(f"unknown method {name!r}{suggest(name, methods)}; known: {', '.join(sorted(methods))}")
    return methods[name]
