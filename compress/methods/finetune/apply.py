"""Fine-tune selected parameters (WeLore's LRC factors by default) with accelerate.

Trainable parameters are chosen peft-style by the shared target grammar: the modules matched by
``targets`` train, everything else (N-LRCs, norms, embeddings) is frozen. The training itself is the
pipeline's one global loop (compress/training.py); ``loss: distill`` trains towards the dense teacher's
next-token distribution (on SmolLM2 at 40 % it narrowed the gap between training and held-out loss but
did not lower held-out perplexity: bench/results/lowrank.md).
"""
from __future__ import annotations

import contextlib

from ...registry import register_method
from ..base import Method, TrainingSetup
from .config import FinetuneConfig


@register_method
class Finetune(Method):
    name = "finetune"
    config_class = FinetuneConfig
    summary = "train only the targeted modules (default: low-rank factors) on calibration text"
    level = "training"

    def training(self, config: FinetuneConfig):
        return config

    @contextlib.contextmanager
    def trainable(self, root, names, config: FinetuneConfig, training):
        """The factors themselves (the default), or LoRA adapters on them, merged into them at the end."""
        if config.adapter is None:
            with super().trainable(root, names, config, training) as setup:
                yield setup
            return
        from peft import get_peft_model

        from ...adapters import lora_config

        adapter = config.adapter
        targets = adapter.targets or config.targets
        peft_model = get_peft_model(root, lora_config(root, rank=adapter.rank, alpha=adapter.alpha, targets=targets,
                                                      ignore=config.ignore))
        params = [p for p in root.parameters() if p.requires_grad]  # peft froze everything but the adapters
        try:
            yield TrainingSetup([{"params": params, "lr": training.lr}],
                                summary={"adapter": f"lora rank {adapter.rank} alpha {adapter.alpha:g}"})
        finally:
            peft_model.merge_and_unload()  # adds each adapter to its factor: ranks and shapes unchanged
            root.requires_grad_(False)
