"""Fine-tune selected parameters (WeLore's LRC factors by default) with accelerate.

Trainable parameters are chosen peft-style by the shared target grammar: the modules
matched by ``targets`` train, everything else (N-LRCs, norms, embeddings) is frozen.
``loss: distill`` trains towards the dense teacher's next-token distribution instead of the
one-hot next token (knowledge distillation; on SmolLM2 at 40 % it narrowed the gap between
training and held-out loss but did not lower held-out perplexity: bench/results/lowrank.md).
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import CompressError
from ...registry import register_method
from ...targets import select_modules
from ...training import train_loop
from ..base import ModelMethod, StageResult
from .config import FinetuneConfig


def mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Token-weighted causal-LM loss over ``windows`` (no gradient)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(batch_size):
            batch = batch.to(next(model.parameters()).device)
            loss = model(input_ids=batch, labels=batch).loss
            n = batch.numel() - batch.shape[0]
            total, count = total + loss.item() * n, count + n
    return total / count


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over the vocabulary, in float32."""
    student = torch.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


def mark_trainable(model: nn.Module, modules: dict[str, nn.Module]) -> int:
    model.requires_grad_(False)
    for module in modules.values():
        module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@register_method
class Finetune(ModelMethod):
    name = "finetune"
    config_class = FinetuneConfig
    summary = "train only the targeted modules (default: low-rank factors) on calibration text"

    def needs_teacher(self, config: FinetuneConfig) -> bool:
        return config.loss == "distill"

    def run(self, model: nn.Module, config: FinetuneConfig, ctx) -> StageResult:
        from accelerate.utils import set_seed

        set_seed(config.seed)
        teacher = ctx.extras.get("teacher")
        if config.loss == "distill" and teacher is None:
            raise CompressError("finetune loss 'distill' needs the dense teacher model (run it through the pipeline)")
        trainable = mark_trainable(model, select_modules(model, config.targets, config.ignore, "finetune.targets"))
        windows = ctx.calibration_windows()
        held = windows[: config.eval_windows]
        was_training = model.training
        model.eval()
        loss_before = mean_loss(model, held, config.batch_size)

        def lm_loss(wrapped, batch):
            return wrapped(input_ids=batch, labels=batch).loss, {}

        def distill_loss(wrapped, batch):
            with torch.no_grad():
                target = teacher.to(batch.device)(input_ids=batch).logits
            return distillation_loss(wrapped(input_ids=batch).logits, target), {}

        params = [p for p in model.parameters() if p.requires_grad]
        run = train_loop(model, [{"params": params, "lr": config.lr}], windows, steps=config.steps,
                         batch_size=config.batch_size, schedule=config.schedule, warmup_steps=config.warmup_steps,
                         max_grad_norm=config.max_grad_norm, weight_decay=config.weight_decay,
                         loss_fn=distill_loss if config.loss == "distill" else lm_loss,
                         desc="finetune", progress=ctx.progress)
        model.requires_grad_(False)
        model.train(was_training)
        model.eval()
        loss_after = mean_loss(model, held, config.batch_size)

        result = StageResult(self.name)
        result.summary = {"steps": config.steps, "tokens": run["tokens"], "wall_time_s": run["wall_time_s"],
                          "lr": config.lr, "schedule": config.schedule, "loss": config.loss,
                          "trainable_params": trainable,
                          "calibration_loss_before": loss_before, "calibration_loss_after": loss_after}
        result.series = {"train_loss": run["losses"]}
        return result
