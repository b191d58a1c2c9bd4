"""compress.eval.perplexity: token-level perplexity checked against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from compress.eval.corpora import load_documents
from compress.eval.perplexity import heldout_perplexity, perplexity
from compress.eval.windows import token_windows


def _reference_nll_sum(model, windows):
    """Predict every token from its own prefix, one forward per position, in float64."""
    total = 0.0
    with torch.no_grad():
        for row in windows:
            for t in range(1, row.numel()):
                logits = model(input_ids=row[:t].unsqueeze(0)).logits[0, -1].double()
                total -= (logits[row[t]] - torch.logsumexp(logits, dim=0)).item()
    return total


@pytest.mark.parametrize("chunk", [128, 5], ids=["one-chunk", "5-token-chunks"])
def test_matches_prefix_by_prefix_reference(eval_tiny_llama, monkeypatch, chunk):
    from compress import activations

    monkeypatch.setattr(activations, "TAIL_CHUNK_TOKENS", chunk)  # the head's tokens per call
    head_rows = []
    handle = eval_tiny_llama.lm_head.register_forward_hook(lambda m, a, out: head_rows.append(a[0][0].shape[0]))
    vocab = eval_tiny_llama.config.vocab_size
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, vocab, (3, 12), generator=g)
    nll_sum = _reference_nll_sum(eval_tiny_llama, windows)
    head_rows.clear()
    expected_tokens = 3 * 11
    for batch_size in (1, 2, 4):
        out = perplexity(eval_tiny_llama, windows, batch_size=batch_size, progress=False)
        assert out["windows"] == 3 and out["tokens"] == expected_tokens
        assert out["nll"] == pytest.approx(nll_sum / expected_tokens, rel=1e-5)
        assert out["perplexity"] == pytest.approx(math.exp(nll_sum / expected_tokens), rel=1e-5)
    handle.remove()
    # the sharpened random model is far from uniform: a vocab-sized answer would be a bug
    assert abs(out["nll"] - math.log(vocab)) > 0.5
    # the head saw every predicting token once per batch size, never more than a chunk of them at once
    assert max(head_rows) <= chunk and sum(head_rows) == 3 * expected_tokens


class _Uniform(torch.nn.Module):
    """Predicts every token with probability 1/vocab; remembers what it was called with."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, input_ids, **kwargs):
        self.calls.append(input_ids.clone())

        class Out:
            logits = torch.zeros(*input_ids.shape, self.vocab) + self.anchor

        return Out()


def test_uniform_model_has_vocab_sized_perplexity():
    model = _Uniform(vocab=1000)
    windows = torch.randint(0, 1000, (5, 7))
    out = perplexity(model, windows, batch_size=2, progress=False)
    assert out["perplexity"] == pytest.approx(1000.0, rel=1e-6)  # float32 log-softmax
    assert out["nll"] == pytest.approx(math.log(1000), rel=1e-7)
    assert out["tokens"] == 5 * 6 and out["windows"] == 5
    assert [c.shape[0] for c in model.calls] == [2, 2, 1]  # batches of 2, windows in order
    assert torch.equal(torch.cat(model.calls), windows)


def test_known_distribution_gives_known_perplexity():
    """A model that puts probability 1/2 on token 0 and spreads the rest uniformly."""

    class Half(_Uniform):
        def forward(self, input_ids, **kwargs):
            out = super().forward(input_ids)
            out.logits[..., 0] = math.log((self.vocab - 1) * 0.5 / 0.5)
            return out

    vocab = 11
    windows = torch.tensor([[5, 0, 0, 3], [0, 0, 7, 0]])  # predicted: 0,0,3 | 0,7,0
    out = perplexity(Half(vocab), windows, progress=False)
    # p(0) = 1/2, p(other) = 1/20 -> nll = (4 ln 2 + 2 ln 20) / 6
    assert out["nll"] == pytest.approx((4 * math.log(2) + 2 * math.log(20)) / 6, rel=1e-6)


def test_restores_training_mode_and_rejects_bad_input(eval_tiny_llama):
    model = _Uniform(vocab=10)
    model.train()
    perplexity(model, torch.zeros(1, 3, dtype=torch.long), progress=False)
    assert model.training
    with pytest.raises(ValueError):
        perplexity(model, torch.zeros(0, 8, dtype=torch.long), progress=False)
    with pytest.raises(ValueError):
        perplexity(model, torch.zeros(8, dtype=torch.long), progress=False)


def test_heldout_perplexity_is_perplexity_of_heldout_windows(eval_tiny_llama, eval_tokenizer):
    out = heldout_perplexity(eval_tiny_llama, eval_tokenizer, "wikipedia", seq_len=32, max_windows=3, progress=False)
    windows = token_windows(eval_tokenizer, load_documents("wikipedia", "heldout"), 32, max_windows=3)
    # the first held-out article is Anarchism: the windows start with its title
    assert eval_tokenizer.decode(windows[0, :4]).startswith("Anarchism")
    direct = perplexity(eval_tiny_llama, windows, progress=False)
    assert out["windows"] == 3 and out["tokens"] == 3 * 31
    assert out["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-9)
    assert (out["corpus"], out["split"], out["seq_len"]) == ("wikipedia", "heldout", 32)
    assert math.isfinite(out["perplexity"]) and out["perplexity"] > 1
