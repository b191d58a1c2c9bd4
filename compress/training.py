"""Training after compression: one config part, one loop, two scopes.

``Training`` holds the hyper-parameters every method shares (with one set of defaults): the ``finetune``
stage is made of them, and any compressing stage may carry a ``train:`` block of them. ``scope`` says
what is trained against what:

* ``global``: the whole model on calibration text, only the stage's new modules trainable (next-token
  loss, or ``distill``: KL to the dense model's next-token distribution). Memory: the whole model.
* ``layer``: right after a decoder layer is compressed, its new modules are trained to reproduce the
  dense layer's output on the calibration stream (relative squared error). Memory: one layer and its
  hidden states, which is what lets it run on models larger than memory.

Both go through ``train_loop`` (AdamW + a transformers schedule + accelerate); what differs between
methods (which parameters, wrappers such as DSFormer's straight-through factoriser, FactorLLM's PA
loss) comes from the method's ``trainable`` hook.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .errors import CompressError


class Training(BaseModel):
    """Training hyper-parameters (the ``finetune`` stage's fields, or a stage's ``train:`` block)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(100, ge=1, le=1_000_000, description="optimiser steps")
    lr: float = Field(1e-4, gt=0, le=1.0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(2, ge=1, description="calibration windows per step")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_windows: int = Field(4, ge=1, description="calibration windows scored before and after training")
    loss: Literal["next_token", "distill"] = Field(
        "next_token",
        description="global scope: next_token = causal-LM loss on the text; distill = KL divergence "
        "to the dense model's next-token distribution (the pipeline keeps a frozen copy "
        "of the model from before the first stage as the teacher)",
    )
    scope: Literal["global", "layer"] = Field(
        "global",
        description="global: the whole model on calibration text; layer: each compressed decoder layer "
        "trained to reproduce the dense layer's output, right after it is compressed",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self):
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        if self.scope == "layer" and self.loss != "next_token":
            raise ValueError("scope: layer trains towards the dense layer's output; loss does not apply there")
        return self

    def loop_options(self) -> dict:
        """The settings ``train_loop`` takes as keyword arguments."""
        names = ("steps", "batch_size", "schedule", "warmup_steps", "max_grad_norm", "weight_decay")
        return {name: getattr(self, name) for name in names}


@dataclass
class SeparateLosses:
    """A step's loss as a sum of parts built and backpropagated one at a time: each callable runs a forward
    pass and returns its part, whose backward runs before the next part is built. The gradients are the
    sum's, but only one part's graph is alive at a time (an elastic model's budgets: one graph, not one per
    budget)."""

    parts: list[Callable[[], torch.Tensor]]


LossFn = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor | SeparateLosses, dict]]


def check_batches_split(recipe) -> None:
    """Several processes split every training batch evenly: say so before any heavy work if one cannot be."""
    from .distributed import world_size

    processes = world_size()
    for index, stage in enumerate(recipe.stages if processes > 1 else ()):
        for training in (stage, getattr(stage, "train", None)):
            if isinstance(training, Training) and training.batch_size % processes:
                raise CompressError(
                    f"stages[{index}]: batch_size {training.batch_size} must be a multiple of the "
                    f"{processes} processes (each trains on an equal slice of every batch)"
                )


def train_loop(
    model: nn.Module,
    param_groups: list[dict],
    data: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    schedule: str,
    warmup_steps: int,
    max_grad_norm: float,
    loss_fn: LossFn,
    weight_decay: float = 0.0,
    desc: str = "train",
    progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
) -> dict:
    """Run ``steps`` optimiser steps over shuffled batches of ``data`` (cycling through it).

    ``data`` is a tensor whose first dimension is sampled (token windows, or window indices);
    ``loss_fn(model, batch)`` returns the loss and a dict of numbers for the progress bar.
    ``on_step(step, tokens)`` runs after every step (e.g. to measure a quality curve); its time is
    excluded from ``wall_time_s`` and the model is put back in train mode afterwards.
    Returns ``{"steps", "tokens", "wall_time_s", "losses", "learning_rates"}`` (per step); the model is left
    unwrapped, in eval mode.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from .distributed import rank, world_size

    params = [p for group in param_groups for p in group["params"]]
    # several processes: a step may leave trainable parameters unused (an elastic budget serves some modules
    # dense, without their factors; a routed step skips an expert), which DDP must be told to look for
    unused = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[unused])
    optimizer = torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
    processes = world_size()
    if processes == 1:
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=False)
        wrapped, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    else:
        # every process draws the same batches (same seed) and trains on its equal slice of each; DDP averages
        # the gradients, so a step is the full batch's. The scheduler stays unprepared: accelerate would step
        # it once per process for every optimiser step.
        if batch_size % processes or len(data) < batch_size:
            raise CompressError(
                f"{desc}: batch_size {batch_size} must be a multiple of the {processes} processes and at most "
                f"the {len(data)} training windows"
            )
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True)
        wrapped, optimizer = accelerator.prepare(model, optimizer)
    wrapped.train()
    losses, rates, tokens, step, paused = [], [], 0, 0, 0.0
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    while step < steps:
        for batch in loader:
            full = batch.numel()
            if processes > 1:
                batch = batch[rank() :: processes].to(accelerator.device)
            loss, shown = loss_fn(wrapped, batch)
            parts = loss.parts if isinstance(loss, SeparateLosses) else [lambda loss=loss: loss]
            value = 0.0
            for index, part in enumerate(parts):
                # several processes average the gradients once per step, after the last part's backward
                last = index == len(parts) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(wrapped):
                    piece = part()
                    value += piece.item()
                    if not math.isfinite(value):
                        raise FloatingPointError(f"{desc}: loss became {value} at step {step}; lower lr")
                    accelerator.backward(piece)
            accelerator.clip_grad_norm_(params, max_grad_norm)
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(value)
            tokens += full
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
    return {"steps": step, "tokens": tokens, "wall_time_s": wall, "losses": losses, "learning_rates": rates}


# ---------------------------------------------------------------- global scope


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


def text_loss(loss: str, teacher: nn.Module | None) -> LossFn:
    """The loss of global training on calibration text: next-token CE, or KL to the teacher's logits."""
    if loss == "next_token":
        return lambda wrapped, batch: (wrapped(input_ids=batch, labels=batch).loss, {})
    if teacher is None:
        raise CompressError("training loss 'distill' needs the dense teacher model (run it through the pipeline)")

    def distill(wrapped, batch):
        with torch.no_grad():
            target = teacher.to(batch.device)(input_ids=batch).logits
        return distillation_loss(wrapped(input_ids=batch).logits, target), {}

    return distill


def train_globally(
    model: nn.Module,
    method,
    config,
    training: Training,
    names: list[str],
    windows: torch.Tensor,
    teacher: nn.Module | None = None,
    progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
) -> dict:
    """Train the modules ``names`` of ``model`` (set up by ``method.trainable``) on calibration ``windows``.

    Returns ``{"summary": ..., "series": {"train_loss": [...], ...}}``; every parameter is frozen afterwards.
    """
    from accelerate.utils import set_seed

    default_loss = text_loss(training.loss, teacher)  # a missing teacher fails before any work
    set_seed(training.seed)
    held = windows[: training.eval_windows]
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    loss_before = mean_loss(model, held, training.batch_size)
    with method.trainable(model, names, config, training) as setup:
        loss_fn = setup.loss_fn or default_loss
        step_hook = None
        if on_step is not None:

            def step_hook(step, tokens):  # callbacks see the inference modules, not training wrappers
                with setup.inference_view():
                    on_step(step, tokens)

        run = train_loop(
            model,
            setup.param_groups,
            windows,
            **training.loop_options(),
            loss_fn=loss_fn,
            desc=f"{method.name} train",
            progress=progress,
            on_step=step_hook,
        )
        trainable = sum(p.numel() for group in setup.param_groups for p in group["params"])
    model.requires_grad_(False)
    model.eval()
    loss_after = mean_loss(model, held, training.batch_size)
    model.train(was_training)
    summary = {
        "scope": "global",
        "steps": run["steps"],
        "tokens": run["tokens"],
        "wall_time_s": run["wall_time_s"],
        "lr": training.lr,
        "schedule": training.schedule,
        "mean_lr": sum(run["learning_rates"]) / max(1, len(run["learning_rates"])),  # what the schedule gave
        "loss": training.loss,
        "trainable_params": trainable,
        "calibration_loss_before": loss_before,
        "calibration_loss_after": loss_after,
        **setup.summary,
    }
    return {"summary": summary, "series": {"train_loss": run["losses"], **setup.series}}


# ---------------------------------------------------------------- layer scope


def single_window_kwargs(value, batch: int):
    """A decoder layer's keyword arguments for one window, broadcastable to any batch size.

    Calibration windows carry no padding and share their positions, so the rotary tables and masks of
    one batch are the same for every window: their batch dimension is cut to 1.
    """
    if isinstance(value, torch.Tensor):
        return value[:1] if value.dim() > 0 and value.shape[0] == batch and batch > 1 else value
    if isinstance(value, tuple):
        return tuple(single_window_kwargs(v, batch) for v in value)
    if isinstance(value, list):
        return [single_window_kwargs(v, batch) for v in value]
    if isinstance(value, dict):
        return {k: single_window_kwargs(v, batch) for k, v in value.items()}
    return value


def relative_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.float() - target.float()).pow(2).mean() / target.float().pow(2).mean().clamp_min(1e-12)


def train_layer(
    layer: nn.Module,
    method,
    config,
    training: Training,
    names: list[str],
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    kwargs: dict,
    progress: bool = False,
) -> dict:
    """Train ``layer``'s modules ``names`` (local names) so that ``layer(inputs)`` matches ``targets``.

    ``inputs``/``targets`` are the calibration stream's hidden states per batch (the dense layer's
    outputs as targets); ``kwargs`` the keyword arguments of the first batch. Returns the summary.
    """
    from accelerate.utils import set_seed

    set_seed(training.seed)
    dtype = next(p.dtype for p in layer.parameters() if p.is_floating_point())  # streams may be held in bf16
    hidden, wanted = torch.cat(list(inputs)).to(dtype), torch.cat(list(targets)).to(dtype)  # every window trains
    kw = single_window_kwargs(kwargs, inputs[0].shape[0])

    def forward(module, index):
        out = module(hidden[index], **kw)
        return out[0] if isinstance(out, tuple) else out

    def evaluate() -> float:
        with torch.no_grad():
            held = torch.arange(min(training.eval_windows, hidden.shape[0]))
            return float(relative_mse(forward(layer, held), wanted[held]))

    layer.requires_grad_(False)
    before = evaluate()
    with method.trainable(layer, names, config, training) as setup:

        def loss_fn(wrapped, index):
            return relative_mse(forward(wrapped, index), wanted[index]), {}

        trainable = sum(p.numel() for group in setup.param_groups for p in group["params"])
        run = train_loop(
            layer,
            setup.param_groups,
            torch.arange(hidden.shape[0]),
            **training.loop_options(),
            loss_fn=loss_fn,
            desc=f"{method.name} layer train",
            progress=progress,
        )
    layer.requires_grad_(False)
    layer.eval()
    return {
        "steps": run["steps"],
        "tokens": run["tokens"] * hidden.shape[1],
        "wall_time_s": run["wall_time_s"],
        "trainable_params": trainable,
        "rel_error_before": before,
        "rel_error_after": evaluate(),
        "losses": run["losses"],
    }
