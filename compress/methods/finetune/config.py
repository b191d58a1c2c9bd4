from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...training import Training
from ..base import StageConfig


class LoraAdapter(BaseModel):
    """Train low-rank adapters on the targeted modules' factors (peft), merged back into them afterwards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["lora"] = "lora"
    rank: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] | None = Field(
        None, description="modules whose factors get adapters (default: the stage's targets)"
    )


class ElasticTraining(BaseModel):
    """Train every budget of an elastic model at once: ``sample`` one budget per step (Maestro's ordered
    dropout) or ``sum``: all of them each step (Starbucks' summed loss, divided by the number of budgets so
    that ``lr`` and ``max_grad_norm`` mean what they mean for one budget)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budgets: list[float] = Field(min_length=1, description="reductions to train, within the model's range")
    rule: Literal["sample", "sum"] = "sum"

    @model_validator(mode="after")
    def _in_range(self):
        if not all(0 < b < 1 for b in self.budgets):
            raise ValueError("budgets are reductions in (0, 1)")
        return self


class FinetuneConfig(Training, StageConfig):
    """Train only the targeted modules' parameters (default: every low-rank factor) on calibration text.

    The fields are the shared training hyper-parameters (``compress.training.Training``); the scope is
    the whole model (layer-local training is a ``train: {scope: layer}`` block of the compressing stage).
    """

    method: Literal["finetune"] = "finetune"
    targets: list[str] = Field(default_factory=lambda: ["LowRankLinear", "GroupedLowRankLinear"], min_length=1)
    adapter: LoraAdapter | None = Field(
        None,
        description="train LoRA adapters on the factors instead of the factors themselves (merged back at the end)",
    )
    elastic: ElasticTraining | None = Field(None, description="elastic models: train several budgets at once")

    @model_validator(mode="after")
    def _global_only(self):
        if self.scope != "global":
            raise ValueError(
                "finetune trains the whole model; for layer-local training give the compressing "
                "stage a `train: {scope: layer}` block"
            )
        if self.elastic is not None and (self.adapter is not None or self.loss != "next_token"):
            raise ValueError("elastic training trains the factors on the next-token loss (no adapter, no distill)")
        return self
