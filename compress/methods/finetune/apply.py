"""Fine-tune selected parameters (WeLore's LRC factors by default) with accelerate.

Trainable parameters are chosen peft-style by the shared target grammar: the modules
matched by ``targets`` train, everything else (N-LRCs, norms, embeddings) is frozen.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from ...registry import register_method
from ...targets import select_modules
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

    def run(self, model: nn.Module, config: FinetuneConfig, ctx) -> StageResult:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from tqdm.auto import tqdm
        from transformers import get_scheduler

        set_seed(config.seed)
        trainable = mark_trainable(model, select_modules(model, config.targets, config.ignore, "finetune.targets"))
        windows = ctx.calibration_windows()
        held = windows[: config.eval_windows]
        was_training = model.training
        model.eval()
        loss_before = mean_loss(model, held, config.batch_size)

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = get_scheduler(config.schedule, optimizer, num_warmup_steps=config.warmup_steps,
                                  num_training_steps=config.steps)
        loader = torch.utils.data.DataLoader(windows, batch_size=config.batch_size, shuffle=True, drop_last=False)
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

        model.train()
        losses, tokens, start = [], 0, time.perf_counter()
        bar = tqdm(total=config.steps, desc="finetune", disable=not ctx.progress, leave=False, dynamic_ncols=True)
        step = 0
        while step < config.steps:
            for batch in loader:
                loss = model(input_ids=batch, labels=batch).loss
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"finetune: loss became {loss.item()} at step {step}; lower lr")
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                tokens += batch.numel()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if step >= config.steps:
                    break
        bar.close()
        wall = time.perf_counter() - start
        model = accelerator.unwrap_model(model)
        model.requires_grad_(False)
        model.train(was_training)
        model.eval()
        loss_after = mean_loss(model, held, config.batch_size)

        result = StageResult(self.name)
        result.summary = {"steps": config.steps, "tokens": tokens, "wall_time_s": wall, "lr": config.lr,
                          "schedule": config.schedule, "trainable_params": trainable,
                          "calibration_loss_before": loss_before, "calibration_loss_after": loss_after}
        result.series = {"train_loss": losses}
        return result
