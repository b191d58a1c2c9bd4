"""Token-level perplexity over non-overlapping windows (README, "Measurement protocol")."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..distributed import shard, sum_number
from .corpora import load_documents
from .windows import token_windows

__all__ = ["perplexity", "heldout_perplexity"]


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameter-less module: fall back to what it says, else CPU
        return torch.device(getattr(model, "device", "cpu"))


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """exp(mean NLL) over every predicted token of every window.

    Each window of ``seq_len`` tokens predicts its tokens ``1 .. seq_len-1`` from the ones
    before it (token 0 is context only), so ``tokens = windows * (seq_len - 1)``. The model is
    called as ``model(input_ids).logits``; log-softmax is taken in float32 and the NLL is summed
    in float64.

    Returns ``{"perplexity", "nll" (mean, nats/token), "tokens", "windows"}``.
    """
    check_windows(windows, batch_size)
    device = _model_device(model)
    was_training = getattr(model, "training", False)
    model.eval()
    total_nll = 0.0
    mine = shard(windows)  # several processes: each scores its share, the sums are added up below
    try:
        with torch.inference_mode():
            for start in tqdm(
                range(0, len(mine), batch_size),
                desc="perplexity",
                unit="batch",
                disable=not progress,
            ):
                ids = mine[start : start + batch_size].to(device=device, dtype=torch.long)
                total_nll += batch_nll(model, ids)
    finally:
        if was_training:
            model.train()

    return summarise_nll(total_nll, windows)


def check_windows(windows: torch.Tensor, batch_size: int) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise ValueError("windows must be a 2-D tensor [num_windows, seq_len] of token ids")
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"need at least one window of >= 2 tokens, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


class _LastHidden(Exception):
    """Raised by a hook on the last decoder layer: its output is all the perplexity needs of the stack."""


def batch_nll(model, ids: torch.Tensor) -> float:
    """The summed NLL of a batch: the model runs to its last decoder layer's output, then its tail on a few
    tokens at a time (:func:`tail_nll_sum`); a model without a decoder stack gives its whole logits."""
    from ..activations import stubbed_layers
    from ..streaming import decoder_stack

    layers = decoder_stack(model)
    if layers is None:
        return nll_sum(model(input_ids=ids, use_cache=False).logits, ids)

    def stop(module, args, output):
        raise _LastHidden(output[0] if isinstance(output, tuple) else output)

    handle = layers[-1].register_forward_hook(stop)
    try:
        model(input_ids=ids, use_cache=False)
        raise RuntimeError("the model's forward never reached its last decoder layer")
    except _LastHidden as reached:
        hidden = reached.args[0]
    finally:
        handle.remove()
    with stubbed_layers(layers) as stubs:
        return tail_nll_sum(model, stubs, hidden, ids)


def tail_nll_sum(model, stubs, hidden: torch.Tensor, ids: torch.Tensor) -> float:
    """The summed NLL of a batch (float64) from its last decoder layer's output ``hidden`` (batch x tokens x D),
    through the model's own tail (final norm, head, soft-capping; its layers are ``stubs``), on
    ``TAIL_CHUNK_TOKENS`` tokens at a time: a batch's logits over a large vocabulary (4 x 512 x 262,144 floats
    for Gemma 3: 2.1 GB) are never held whole. Log-softmax in float32, as :func:`nll_sum`."""
    from ..activations import TAIL_CHUNK_TOKENS

    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # the last token of a window predicts nothing
    targets = ids[:, 1:].reshape(-1)
    total = 0.0
    try:
        for start in range(0, targets.numel(), TAIL_CHUNK_TOKENS):
            stubs[0].replay = states[start : start + TAIL_CHUNK_TOKENS][None]
            target = targets[start : start + TAIL_CHUNK_TOKENS]
            logprobs = torch.log_softmax(model(input_ids=target[None], use_cache=False).logits[0].float(), dim=-1)
            total -= logprobs.gather(-1, target.unsqueeze(-1)).double().sum().item()
    finally:
        stubs[0].replay = None
    return total


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """The summed NLL (float64) of tokens 1.. of each window from the logits before them (log-softmax in float32,
    one window at a time: a second [batch, seq, vocab] tensor beside the logits would double the peak)."""
    total = 0.0
    for window_logits, window_ids in zip(logits, ids):
        logprobs = torch.log_softmax(window_logits[:-1].float(), dim=-1)
        total -= logprobs.gather(-1, window_ids[1:].unsqueeze(-1)).double().sum().item()
    return total


def summarise_nll(total_nll: float, windows: torch.Tensor) -> dict:
    """This process's NLL sum (every process's, added up) as the perplexity dict."""
    n, seq_len = windows.shape
    tokens = n * (seq_len - 1)
    nll = sum_number(total_nll) / tokens
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": tokens, "windows": int(n)}


def heldout_perplexity(
    model,
    tokenizer,
    corpus: str = "wikipedia",
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    split: str = "heldout",
) -> dict:
    """Perplexity of ``model`` on the held-out split of ``corpus`` (the README's measurement protocol).

    The result of :func:`perplexity` plus ``corpus``, ``split`` and ``seq_len``.
    """
    docs = load_documents(corpus, split)
    windows = token_windows(tokenizer, docs, seq_len, max_windows=max_windows)
    if windows.shape[0] == 0:
        raise ValueError(f"{corpus}/{split} yields no full window of {seq_len} tokens")
    result = perplexity(model, windows, batch_size=batch_size, progress=progress)
    return {**result, "corpus": corpus, "split": split, "seq_len": int(seq_len)}
