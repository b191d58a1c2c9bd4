"""compress.eval.windows.token_windows: EOS-joined, non-overlapping, ragged tail dropped."""

from __future__ import annotations

import pytest
import torch

from compress.eval.windows import token_windows


class CharTokenizer:
    """Stand-in tokenizer: one token per character (ord + 10), EOS = 3."""

    eos_token_id = 3

    def __call__(self, texts, add_special_tokens=True, verbose=True):
        assert add_special_tokens is False  # documents are joined by hand, no BOS per document
        return {"input_ids": [[ord(c) + 10 for c in t] for t in texts]}


def _stream(docs):
    out = []
    for i, d in enumerate(docs):
        if i:
            out.append(3)
        out.extend(ord(c) + 10 for c in d)
    return out


def test_windows_are_consecutive_slices_of_the_eos_joined_stream():
    docs = ["abcdefg", "hij", "", "klmnopqrstuvwxyz", "0123456789" * 3]
    stream = _stream(docs)  # 7+1+3+1+0+1+16+1+30 = 60 tokens
    assert len(stream) == 60
    w = token_windows(CharTokenizer(), docs, seq_len=8)
    assert w.dtype == torch.long and w.shape == (7, 8)  # 60 // 8 = 7, 4 tokens of tail dropped
    assert w.flatten().tolist() == stream[:56]
    # non-overlapping and in order: window i starts exactly where window i-1 ends
    for i in range(7):
        assert w[i].tolist() == stream[8 * i : 8 * i + 8]
    # EOS sits exactly at the document boundaries (the empty document gives two in a row)
    assert [i for i, t in enumerate(w.flatten().tolist()) if t == 3] == [7, 11, 12, 29]


def test_max_windows_takes_the_first_windows():
    docs = ["x" * 100, "y" * 100]
    full = token_windows(CharTokenizer(), docs, seq_len=10)
    assert full.shape == (20, 10)  # 201 tokens
    first = token_windows(CharTokenizer(), docs, seq_len=10, max_windows=3)
    assert torch.equal(first, full[:3])
    assert token_windows(CharTokenizer(), docs, seq_len=10, max_windows=500).shape == (20, 10)
    assert token_windows(CharTokenizer(), docs, seq_len=10, max_windows=0).shape == (0, 10)
    assert token_windows(CharTokenizer(), ["abc"], seq_len=10).shape == (0, 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        token_windows(CharTokenizer(), ["abc"], seq_len=1)
    with pytest.raises(ValueError, match="max_windows"):
        token_windows(CharTokenizer(), ["abc"], seq_len=2, max_windows=-1)
    with pytest.raises(TypeError):
        token_windows(CharTokenizer(), "a single string", seq_len=2)

    class NoEos(CharTokenizer):
        eos_token_id = None

    with pytest.raises(ValueError, match="eos"):
        token_windows(NoEos(), ["abc"], seq_len=2)


def test_real_tokenizer_matches_per_document_encoding(eval_tokenizer):
    docs = [
        "The quick brown fox jumps over the lazy dog.",
        "Anarchism is a political philosophy.",
        "To be, or not to be: that is the question.",
    ]
    eos = eval_tokenizer.eos_token_id
    stream = []
    for i, d in enumerate(docs):
        if i:
            stream.append(eos)
        stream.extend(eval_tokenizer.encode(d, add_special_tokens=False))
    w = token_windows(eval_tokenizer, docs, seq_len=5)
    assert w.shape == (len(stream) // 5, 5)
    assert w.flatten().tolist() == stream[: w.numel()]
    assert eval_tokenizer.bos_token_id not in w.flatten().tolist()
