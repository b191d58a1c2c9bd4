"""Aligned word vectors (word2vec/fastText ``.vec`` text) and the subword vectors derived from them.

OFA (like WECHSEL) measures how similar two subwords are in an external multilingual word-vector
space. A subword's vector is the vector of the word it spells, when the file has that word;
otherwise the mean vector of the words whose tokenisation contains it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import CompressError


def read_vec(path: str | Path, max_words: int | None = None) -> tuple[list[str], torch.Tensor]:
    """(words, vectors N x d float32) from a .vec file; an optional first line 'N d' is a header."""
    path = Path(path).expanduser()
    words, rows, width = [], [], None
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise CompressError(f"vectors file {path}: {exc.strerror}") from None
    with handle:
        for number, line in enumerate(handle, 1):
            fields = line.rstrip().split(" ")
            if number == 1 and len(fields) == 2 and all(f.isdigit() for f in fields):
                width = int(fields[1])
                continue
            if not line.strip():
                continue
            if len(fields) < 2:
                raise CompressError(f"vectors file {path} line {number}: expected 'word v1 ... vd'")
            try:
                values = [float(v) for v in fields[1:]]
            except ValueError:
                raise CompressError(
                    f"vectors file {path} line {number}: non-numeric value after {fields[0]!r}"
                ) from None
            if width is None:
                width = len(values)
            if len(values) != width:
                raise CompressError(f"vectors file {path} line {number}: {len(values)} values, expected {width}")
            words.append(fields[0])
            rows.append(values)
            if max_words is not None and len(words) >= max_words:
                break
    if not words:
        raise CompressError(f"vectors file {path} holds no vectors")
    return words, torch.tensor(rows, dtype=torch.float32)


def token_surface(tokenizer, token: str) -> str:
    """The text a vocabulary entry spells ('Ġcat' / '▁cat' -> 'cat')."""
    try:
        text = tokenizer.convert_tokens_to_string([token])
    except Exception:  # some special tokens do not round-trip
        text = token
    return text.strip()


def subword_vectors(tokenizer, words: list[str], vectors: torch.Tensor) -> dict[int, torch.Tensor]:
    """{token id: vector} for every vocabulary entry the word vectors can say something about."""
    index = {word: i for i, word in enumerate(words)}
    lower = {}
    for i, word in enumerate(words):
        lower.setdefault(word.lower(), i)
    out: dict[int, torch.Tensor] = {}
    for token, token_id in tokenizer.get_vocab().items():
        surface = token_surface(tokenizer, token)
        hit = index.get(surface, lower.get(surface.lower())) if surface else None
        if hit is not None:
            out[token_id] = vectors[hit]
    # the rest: mean over the words whose tokenisation (word-initial, i.e. after a space, and bare) contains them
    sums = torch.zeros(len(tokenizer), vectors.shape[1], dtype=torch.float64)
    counts = torch.zeros(len(tokenizer), dtype=torch.float64)
    spaced = tokenizer([" " + word for word in words], add_special_tokens=False)["input_ids"]
    bare = tokenizer(words, add_special_tokens=False)["input_ids"]
    for i, (a, b) in enumerate(zip(spaced, bare)):
        ids = torch.tensor(sorted(set(a) | set(b)), dtype=torch.long)
        ids = ids[ids < len(counts)]
        sums.index_add_(0, ids, vectors[i].to(torch.float64).expand(len(ids), -1))
        counts.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
    for token_id in torch.nonzero(counts > 0).flatten().tolist():
        if token_id not in out:
            out[token_id] = (sums[token_id] / counts[token_id]).to(torch.float32)
    return out
