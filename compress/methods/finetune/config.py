from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ...training import Training
from ..base import StageConfig


class FinetuneConfig(Training, StageConfig):
    """Train only the targeted modules' parameters (default: every low-rank factor) on calibration text.

    The fields are the shared training hyper-parameters (``compress.training.Training``); the scope is
    the whole model (layer-local training is a ``train: {scope: layer}`` block of the compressing stage).
    """

    method: Literal["finetune"] = "finetune"
    targets: list[str] = Field(default_factory=lambda: ["LowRankLinear", "GroupedLowRankLinear"], min_length=1)

    @model_validator(mode="after")
    def _global_only(self):
        if self.scope != "global":
            raise ValueError("finetune trains the whole model; for layer-local training give the compressing "
                             "stage a `train: {scope: layer}` block")
        return self
