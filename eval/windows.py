"""Documents -> fixed-length token windows (the unit of the perplexity protocol, README "Measurement protocol")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["token_windows"]

_TOKENIZE_CHUNK = 8  # documents tokenized per call (lets max_windows stop early)


def token_windows(
    tokenizer,
    documents: Sequence[str],
    seq_len: int,
    max_windows: int | None = None,
) -> torch.LongTensor:
    """Tokenize ``documents``, join them with the tokenizer's EOS id, cut into windows.

    Documents are encoded without special tokens, concatenated in order as
    ``doc0 EOS doc1 EOS ... docN`` and cut into consecutive NON-overlapping windows of
    ``seq_len`` tokens; the ragged tail is dropped. With ``max_windows`` only the first
    ``max_windows`` windows are returned (and tokenization stops once they are filled).

    Returns a ``torch.long`` tensor of shape ``[N, seq_len]`` (``N`` may be 0).
    """
    if isinstance(documents, str):
        raise TypeError("documents must be a sequence of strings, not a single string")
    if int(seq_len) != seq_len or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    seq_len = int(seq_len)
    if max_windows is not None and (int(max_windows) != max_windows or max_windows < 0):
        raise ValueError(f"max_windows must be a non-negative integer or None, got {max_windows!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id to join documents with")

    needed = None if max_windows is None else int(max_windows) * seq_len
    ids: list[int] = []
    for start in range(0, len(documents), _TOKENIZE_CHUNK):
        if needed is not None and len(ids) >= needed:
            break
        batch = list(documents[start : start + _TOKENIZE_CHUNK])
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for i, doc_ids in enumerate(encoded):
            if start + i > 0:
                ids.append(eos)
            ids.extend(doc_ids)

    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, int(max_windows))
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
