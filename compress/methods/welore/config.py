from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ...training import Training
from ..base import DECODER_PROJECTIONS, StageConfig


class WeLoreConfig(StageConfig):
    """WeLore (arXiv 2407.11239): one global threshold on normalised singular spectra."""

    method: Literal["welore"] = "welore"
    targets: list[str] = Field(default_factory=lambda: [DECODER_PROJECTIONS], min_length=1)
    train: Training | None = Field(
        None,
        description="train the new factors afterwards: the whole model "
        "(scope: global) or each layer against the dense one (scope: layer)",
    )
    reduction: float | None = Field(None, gt=0, lt=1, description="fraction of targeted parameters to remove")
    threshold: float | None = Field(None, gt=0, lt=1, description="WeLore's tau on the normalised spectrum")
    min_ratio: float = Field(0.0, ge=0, lt=1, description="matrices losing a smaller fraction of ranks stay dense")

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.reduction is None) == (self.threshold is None):
            raise ValueError("give exactly one of 'reduction' or 'threshold'")
        return self
