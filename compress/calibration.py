"""Calibration text -> token windows, from one source or a weighted mix of several.

A source is a bundled corpus (its calibration split: held-out documents are never used), a Hugging Face
dataset (``dataset: owner/name``, through the ``datasets`` library and its cache) or a local ``.txt``,
``.jsonl``/``.json`` or ``.parquet`` file (read by ``datasets`` too). A record's text is its ``text_field``,
or its ``messages_field`` (a list of ``{role, content}``) rendered with the tokenizer's chat template.
Each source gives its share of the windows (by ``weight``); the sources' windows are interleaved, so any
prefix of the set (e.g. the first 16 windows a sensitivity pass reads) keeps the mix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from .errors import CompressError


@dataclass
class CalibrationSet:
    windows: torch.Tensor  # [samples, seq_len] token ids
    sources: list[dict]  # per source: what it is, its weight and how many windows it gave


def source_documents(source) -> list:
    """The documents of one source: strings, or message lists when ``messages_field`` is set."""
    if source.corpus is not None:
        from .eval.corpora import CorpusSourceMissing, load_documents

        try:
            return load_documents(source.corpus, "calibration")[: source.max_documents]
        except CorpusSourceMissing as exc:
            raise CompressError(str(exc)) from None
    file = None if source.file is None else str(Path(source.file).expanduser())
    rows = _dataset_rows(source.dataset, source.config, source.split, file, source.max_documents)
    field = source.messages_field or source.text_field
    if rows and field not in rows[0]:
        raise CompressError(
            f"calibration source {source.describe()}: no field {field!r} (fields: {', '.join(sorted(rows[0]))})"
        )
    documents = [row[field] for row in rows if row[field]]
    if not documents:
        raise CompressError(f"calibration source {source.describe()}: no documents")
    return documents


@cache  # the early check and the window building read the same rows
def _dataset_rows(
    dataset: str | None, config: str | None, split: str, file: str | None, max_documents: int | None
) -> list[dict]:
    from .utils import require

    require("datasets", "datasets", "calibration on a dataset or a local file")
    import datasets

    where = dataset if dataset is not None else file
    try:
        if dataset is not None:
            loaded = datasets.load_dataset(dataset, config, split=split)
        else:
            kind = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(
                "." + file.rsplit(".", 1)[-1].lower()
            )
            if kind is None:
                raise CompressError(f"calibration file {file}: use a .txt, .jsonl, .json or .parquet file")
            loaded = datasets.load_dataset(
                kind, data_files=file, split="train", **({"sample_by": "document"} if kind == "text" else {})
            )
    except CompressError:
        raise
    except Exception as exc:  # datasets raises many types for a missing or unreadable dataset
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressError(f"calibration data {where!r} cannot be loaded: {first}") from None
    if max_documents is not None and max_documents < len(loaded):
        loaded = loaded.select(range(max_documents))  # only these rows are materialised
    return loaded.to_list()


def check_calibration(config) -> None:
    """Load every source's documents now (before any model loads): a missing dataset is one line, early."""
    for source in config.resolved_sources():
        source_documents(source)


def window_counts(weights: list[float], samples: int) -> list[int]:
    """``samples`` split by ``weights`` (largest remainders; every source gets at least one window)."""
    total = sum(weights)
    exact = [w / total * samples for w in weights]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)[: samples - sum(counts)]:
        counts[i] += 1
    for i, n in enumerate(counts):  # a tiny weight still contributes one window
        if n == 0 and samples >= len(counts):
            donor = max(range(len(counts)), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] = 1
    return counts


def interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """The windows of every source merged by relative position (source k's i-th of n_k at (i + 0.5) / n_k)."""
    keys = [((i + 0.5) / len(part), k, i) for k, part in enumerate(parts) for i in range(len(part))]
    return torch.stack([parts[k][i] for _, k, i in sorted(keys)]) if keys else torch.empty(0, 0, dtype=torch.long)


def build_calibration(tokenizer, config) -> CalibrationSet:
    """``config.samples`` windows of ``config.seq_len`` tokens from the config's sources, interleaved."""
    from .eval.windows import token_windows

    sources = config.resolved_sources()
    counts = window_counts([s.weight for s in sources], config.samples)
    parts, described = [], []
    for source, count in zip(sources, counts):
        documents = source_documents(source)
        if source.messages_field is not None:
            documents = [_render_chat(tokenizer, messages, source) for messages in documents]
        windows = token_windows(tokenizer, documents, config.seq_len, count)
        if windows.shape[0] < count:
            raise CompressError(
                f"calibration source {source.describe()} gives only {windows.shape[0]} windows of "
                f"{config.seq_len} tokens, fewer than the {count} it should give"
            )
        parts.append(windows)
        described.append({"source": source.describe(), "weight": source.weight, "windows": count})
    return CalibrationSet(interleave(parts), described)


def _render_chat(tokenizer, messages, source) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise CompressError(
            f"calibration source {source.describe()}: messages need a chat template, and the model's tokenizer has none"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False)


def calibration_windows(tokenizer, calibration) -> torch.Tensor:
    return build_calibration(tokenizer, calibration).windows


def lazy_calibration_windows(tokenizer, calibration) -> Callable[[], torch.Tensor]:
    """A ``StageContext.calibration_windows`` callable: tokenises on first use, then reuses the windows."""
    return cache(lambda: calibration_windows(tokenizer, calibration))
