"""The covariance of the hidden states that meet the embedding rows in a tied LM head (for ``fit: logits``)."""
from __future__ import annotations

import torch
from torch import nn

from ...errors import CompressError


class _HeadInputCaptured(Exception):
    """Raised by the capture hook: the logits themselves are not needed, so the forward stops there."""


def head_input_covariance(model: nn.Module, head: nn.Module, windows: torch.Tensor, batch_size: int = 4):
    """Sigma = mean h h^T (D x D, float64) of the hidden states entering the LM head on ``windows``."""
    total, count = None, 0

    def capture(module, args):
        raise _HeadInputCaptured(args[0])

    handle = head.register_forward_pre_hook(capture)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _HeadInputCaptured as captured:
                    h = captured.args[0].reshape(-1, captured.args[0].shape[-1]).to(torch.float64)
                    total = h.T @ h if total is None else total + h.T @ h
                    count += h.shape[0]
    finally:
        handle.remove()
    if total is None:
        raise CompressError("ofa_embedding: the model's forward never reached its LM head")
    return total / count
