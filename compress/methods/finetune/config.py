from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..base import StageConfig


class FinetuneConfig(StageConfig):
    """Train only the targeted modules' parameters (default: every low-rank factor) on calibration text."""

    method: Literal["finetune"] = "finetune"
    targets: list[str] = Field(default_factory=lambda: ["LowRankLinear", "GroupedLowRankLinear"], min_length=1)
    steps: int = Field(100, ge=1, le=1_000_000)
    lr: float = Field(1e-4, gt=0, le=1.0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(4, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_windows: int = Field(8, ge=1, description="calibration windows scored before and after training")
    loss: Literal["next_token", "distill"] = Field(
        "next_token", description="next_token: causal-LM loss on the text; distill: KL divergence to the dense "
                                  "model's next-token distribution (knowledge distillation; the pipeline keeps a "
                                  "frozen copy of the model from before the first stage as the teacher)")
    seed: int = 0

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self
