"""Calibration text -> token windows (from the non-held-out split only)."""
from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch

from .errors import CompressError


def calibration_windows(tokenizer, calibration) -> torch.Tensor:
    """``calibration.samples`` windows of ``calibration.seq_len`` tokens from the calibration split."""
    from .eval.corpora import load_documents
    from .eval.windows import token_windows

    documents = load_documents(calibration.corpus, "calibration")
    windows = token_windows(tokenizer, documents, calibration.seq_len, calibration.samples)
    if windows.shape[0] < calibration.samples:
        raise CompressError(f"calibration: corpus {calibration.corpus!r} gives only {windows.shape[0]} windows of "
                            f"{calibration.seq_len} tokens, fewer than samples={calibration.samples}")
    return windows


def lazy_calibration_windows(tokenizer, calibration) -> Callable[[], torch.Tensor]:
    """A ``StageContext.calibration_windows`` callable: tokenises on first use, then reuses the windows."""
    return cache(lambda: calibration_windows(tokenizer, calibration))
