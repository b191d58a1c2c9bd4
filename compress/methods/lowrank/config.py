from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...training import Training
from ..base import DECODER_PROJECTIONS, StageConfig

Backend = Literal["svd", "asvd", "whiten", "whiten_dense_target"]


class ElasticRange(BaseModel):
    """The budgets an elastic checkpoint serves: factors are stored at the ranks ``min_reduction`` needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_reduction: float = Field(gt=0, lt=1)
    max_reduction: float = Field(gt=0, lt=1)
    # other budgets with calibration streams of their own (one more pass per layer and budget), used by `fit`
    calibrate_on: list[float] = Field(default_factory=list)
    # pooled: each layer's factors fit the inputs of every calibrated budget at once (statistics summed);
    # nested: a matrix's leading ranks fit the most compressed budget's stream, each further range of ranks the
    # next budget's stream given the ranks before it, so every calibrated budget is served by factors fitted to
    # the inputs that budget gives the layer (whitening backends);
    # anchored: each calibrated budget (above `reduction`) gets factors of its own, fit on its stream, which serve
    # the budgets from it up to the next one (more bytes: each anchor stores its budget's factors)
    fit: Literal["pooled", "nested", "anchored"] = "pooled"

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_reduction >= self.max_reduction:
            raise ValueError("min_reduction must be below max_reduction")
        if any(not self.min_reduction <= b <= self.max_reduction for b in self.calibrate_on):
            raise ValueError("calibrate_on budgets must lie in the elastic range")
        return self


class LowRankConfig(StageConfig):
    """Truncated factorisation of each targeted Linear under a parameter budget.

    ``backend`` picks the decomposition (see ``compress.lowrank_math``): ``svd`` (data-free),
    ``asvd`` (activation-scaled columns), ``whiten`` (SVD-LLM), ``whiten_dense_target`` (exact
    rank-k fit of the *dense* layer's output from the compressed prefix's inputs). The
    activation-aware backends calibrate layer by layer (``sequential``).
    """

    method: Literal["lowrank"] = "lowrank"
    targets: list[str] = Field(default_factory=lambda: [DECODER_PROJECTIONS], min_length=1)
    train: Training | None = Field(
        None,
        description="train the new factors afterwards: the whole model "
        "(scope: global) or each layer against the dense one (scope: layer)",
    )
    reduction: float = Field(gt=0, lt=1, description="fraction of the targeted parameters to remove")
    backend: Backend = "svd"
    allocation: Literal["uniform", "sensitivity"] = Field(
        "uniform",
        description="uniform: every matrix loses `reduction`; sensitivity: ranks chosen under the "
        "global budget by Fisher-weighted output error on calibration data",
    )
    alpha: float = Field(0.5, gt=0, le=2, description="asvd: columns scaled by mean|x|^alpha")
    shrinkage: float = Field(
        0.0,
        ge=0,
        le=10,
        description="add shrinkage*diag(C) to the activation covariances (ridge against calibration over-fit)",
    )
    sequential: bool = Field(True, description="layer i calibrates on the outputs of compressed layers < i")
    sublayer: bool = Field(
        False,
        description="with sequential: also inside each layer, o_proj calibrates after "
        "q/k/v are compressed and down_proj after gate/up (more passes)",
    )
    refine: bool = Field(
        False,
        description="closed-form least-squares refit of both factors against the dense "
        "layer's outputs after truncation (a no-op after "
        "whiten_dense_target; pair it with shrinkage > 0: unregularised it "
        "over-fits small calibration sets badly)",
    )
    calibration_batch_size: int = Field(4, ge=1, le=1024)
    calibration_windows: int | None = Field(
        None,
        ge=1,
        description="calibration windows the layer statistics "
        "use (the first N; default all): a later training stage may use more",
    )
    sensitivity_windows: int = Field(16, ge=1, description="calibration windows used to measure sensitivities")
    elastic: ElasticRange | None = Field(
        None,
        description="store factors and loss curves for every budget of "
        "this range (compress.set_budget / compress.resize); reduction is "
        "the budget the checkpoint starts at",
    )

    @model_validator(mode="after")
    def _sublayer_needs_sequential(self):
        if self.sublayer and not self.sequential:
            raise ValueError("sublayer: true needs sequential: true")
        if self.elastic is not None:
            if self.allocation != "sensitivity":
                raise ValueError("elastic needs allocation: sensitivity (its curves are what a resize re-allocates)")
            if self.refine:
                raise ValueError("elastic needs ordered factors; refine re-fits them as a whole")
            if not self.elastic.min_reduction <= self.reduction <= self.elastic.max_reduction:
                raise ValueError("reduction must lie in the elastic range")
            if self.elastic.calibrate_on and (self.backend == "svd" or not self.sequential):
                raise ValueError("elastic.calibrate_on needs an activation-aware backend and sequential: true")
            if self.elastic.fit == "nested" and self.backend not in ("whiten", "whiten_dense_target"):
                raise ValueError("elastic.fit: nested needs a whitening backend (whiten or whiten_dense_target)")
            if self.elastic.fit == "anchored" and not (
                self.elastic.calibrate_on and all(b > self.reduction for b in self.elastic.calibrate_on)
            ):
                raise ValueError("elastic.fit: anchored needs calibrate_on budgets, all above reduction")
        return self
