"""compress.eval: offline corpora, token-level perplexity and the lm-eval adapter.

Importing this package is cheap: torch, lm-eval and datasets load only when a function that
needs them is first used (attributes below are resolved lazily).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "compress_cache_dir": ".cache",
    "CORPORA": ".corpora",
    "SPLITS": ".corpora",
    "CorpusSourceMissing": ".corpora",
    "load_documents": ".corpora",
    "load_records": ".corpora",
    "token_windows": ".windows",
    "perplexity": ".perplexity",
    "heldout_perplexity": ".perplexity",
    "TASKS": ".lm_eval_runner",
    "available_tasks": ".lm_eval_runner",
    "run_lm_eval": ".lm_eval_runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
