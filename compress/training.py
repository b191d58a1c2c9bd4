"""The one training loop: AdamW + a transformers schedule + accelerate, used by every method that trains.

``finetune`` (and through it dsformer/lost and OFA's factor training) and FactorLLM's PA training
differ only in which parameters train and what the loss is, so they pass parameter groups and a
``loss_fn``; device placement (one CPU process here, GPUs where present), clipping, the NaN guard
and the progress bar live here once.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn


def train_loop(model: nn.Module, param_groups: list[dict], windows: torch.Tensor, *, steps: int, batch_size: int,
               schedule: str, warmup_steps: int, max_grad_norm: float,
               loss_fn: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, dict]], weight_decay: float = 0.0,
               desc: str = "train", progress: bool = True,
               on_step: Callable[[int, int], None] | None = None) -> dict:
    """Run ``steps`` optimiser steps over shuffled batches of ``windows`` (cycling through them).

    ``loss_fn(model, batch)`` returns the loss and a dict of numbers for the progress bar.
    ``on_step(step, tokens)`` runs after every step (e.g. to measure a quality curve); its time is
    excluded from ``wall_time_s`` and the model is put back in train mode afterwards.
    Returns ``{"steps", "tokens", "wall_time_s", "losses"}``; the model is left unwrapped, in eval mode.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    params = [p for group in param_groups for p in group["params"]]
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    optimizer = torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
    loader = torch.utils.data.DataLoader(windows, batch_size=batch_size, shuffle=True, drop_last=False)
    wrapped, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    wrapped.train()
    losses, tokens, step, paused = [], 0, 0, 0.0
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    while step < steps:
        for batch in loader:
            loss, shown = loss_fn(wrapped, batch)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"{desc}: loss became {value} at step {step}; lower lr")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(value)
            tokens += batch.numel()
            step += 1
            bar.update(1)
            bar.set_postfix({key: f"{v:.3f}" for key, v in {"loss": value, **shown}.items()})
            if on_step is not None:
                pause = time.perf_counter()
                try:
                    on_step(step, tokens)
                finally:
                    paused += time.perf_counter() - pause
                    wrapped.train()
            if step >= steps:
                break
    bar.close()
    wall = time.perf_counter() - start - paused
    accelerator.unwrap_model(wrapped).eval()
    return {"steps": step, "tokens": tokens, "wall_time_s": wall, "losses": losses}
