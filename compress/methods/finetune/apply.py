"""Fine-tune selected parameters (WeLore's LRC factors by default) with accelerate.

Trainable parameters are chosen peft-style by the shared target grammar: the modules matched by
``targets`` train, everything else (N-LRCs, norms, embeddings) is frozen. The training itself is the
pipeline's one global loop (compress/training.py); ``loss: distill`` trains towards the dense teacher's
next-token distribution (on SmolLM2 at 40 % it narrowed the gap between training and held-out loss but
did not lower held-out perplexity: bench/results/lowrank.md).
"""

from __future__ import annotations

import contextlib

from ...elastic import elastic_modules
from ...registry import register_method
from ..base import Method, TrainingSetup
from .config import FinetuneConfig


@contextlib.contextmanager
def elastic_loss(model, elastic):
    """The next-token loss of an elastic model at its budgets: one sampled per step, or their mean (each
    budget's part backpropagated on its own). The model's own budget (active ranks) is restored afterwards."""
    import torch

    from ...elastic import ranks_for, select, selections
    from ...training import SeparateLosses

    before = selections(model)
    allocations = [ranks_for(model, budget) for budget in elastic.budgets]  # once: the curves do not change

    def loss(wrapped, batch):
        chosen = allocations if elastic.rule == "sum" else [allocations[int(torch.randint(len(allocations), ()))]]

        def at(ranks):
            def part():
                select(model, ranks)
                return wrapped(input_ids=batch, labels=batch).loss / len(chosen)

            return part

        # each budget's graph is backpropagated before the next budget's is built: memory of one budget
        return SeparateLosses([at(ranks) for ranks in chosen]), {}

    try:
        yield loss
    finally:
        select(model, before)


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
        if config.elastic is not None:
            with super().trainable(root, names, config, training) as setup, elastic_loss(root, config.elastic) as loss:
                # the dense weights some budgets serve stay the dense model's, as the nn.Linear a single-budget
                # healing leaves alone (and they would double the optimiser's state)
                dense = [
                    m.dense_weight.requires_grad_(False)
                    for m in elastic_modules(root).values()
                    if m.dense_weight is not None
                ]
                frozen = {id(p) for p in dense}
                for group in setup.param_groups:
                    group["params"] = [p for p in group["params"] if id(p) not in frozen]
                setup.loss_fn = loss
                setup.summary["elastic"] = f"{config.elastic.rule} over {config.elastic.budgets}"
                yield setup
            return
        if config.adapter is None:
            with super().trainable(root, names, config, training) as setup:
                yield setup
            return
        from peft import get_peft_model

        from ...adapters import lora_config

        adapter = config.adapter
        targets = adapter.targets or config.targets
        peft_model = get_peft_model(
            root, lora_config(root, rank=adapter.rank, alpha=adapter.alpha, targets=targets, ignore=config.ignore)
        )
        params = [p for p in root.parameters() if p.requires_grad]  # peft froze everything but the adapters
        try:
            yield TrainingSetup(
                [{"params": params, "lr": training.lr}],
                summary={"adapter": f"lora rank {adapter.rank} alpha {adapter.alpha:g}"},
            )
        finally:
            peft_model.merge_and_unload()  # adds each adapter to its factor: ranks and shapes unchanged
            root.requires_grad_(False)
