"""Fine-tune selected parameters (WeLore's LRC factors by default) with accelerate.

Trainable parameters are chosen peft-style by the shared target grammar: the modules matched by
``targets`` train, everything else (N-LRCs, norms, embeddings) is frozen. The training itself is the
pipeline's one global loop (compress/training.py); ``loss: distill`` trains towards the dense teacher's
next-token distribution (on SmolLM2 at 40 % it narrowed the gap between training and held-out loss but
did not lower held-out perplexity: bench/results/lowrank.md).
"""
from __future__ import annotations

from ...registry import register_method
from ..base import Method
from .config import FinetuneConfig


@register_method
class Finetune(Method):
    name = "finetune"
    config_class = FinetuneConfig
    summary = "train only the targeted modules (default: low-rank factors) on calibration text"
    level = "training"

    def training(self, config: FinetuneConfig):
        return config
