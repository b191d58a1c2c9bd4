from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ...training import Training
from ..base import DECODER_PROJECTIONS, StageConfig

Backend = Literal["svd", "asvd", "whiten", "whiten_dense_target"]


class LowRankConfig(StageConfig):
    """Truncated factorisation of each targeted Linear under a parameter budget.

    ``backend`` picks the decomposition (see ``compress.lowrank_math``): ``svd`` (data-free),
    ``asvd`` (activation-scaled columns), ``whiten`` (SVD-LLM), ``whiten_dense_target`` (exact
    rank-k fit of the *dense* layer's output from the compressed prefix's inputs). The
    activation-aware backends calibrate layer by layer (``sequential``).
    """

    method: Literal["lowrank"] = "lowrank"
    targets: list[str] = Field(default_factory=lambda: [DECODER_PROJECTIONS], min_length=1)
    train: Training | None = Field(None, description="train the new factors afterwards: the whole model "
                                   "(scope: global) or each layer against the dense one (scope: layer)")
    reduction: float = Field(gt=0, lt=1, description="fraction of the targeted parameters to remove")
    backend: Backend = "svd"
    allocation: Literal["uniform", "sensitivity"] = Field(
        "uniform", description="uniform: every matrix loses `reduction`; sensitivity: ranks chosen under the "
                               "global budget by Fisher-weighted output error on calibration data")
    alpha: float = Field(0.5, gt=0, le=2, description="asvd: columns scaled by mean|x|^alpha")
    shrinkage: float = Field(0.0, ge=0, le=10, description="add shrinkage*diag(C) to the activation "
                                                           "covariances (ridge against calibration over-fit)")
    sequential: bool = Field(True, description="layer i calibrates on the outputs of compressed layers < i")
    sublayer: bool = Field(False, description="with sequential: also inside each layer, o_proj calibrates after "
                                              "q/k/v are compressed and down_proj after gate/up (more passes)")
    refine: bool = Field(False, description="closed-form least-squares refit of both factors against the dense "
                                            "layer's outputs after truncation (a no-op after "
                                            "whiten_dense_target; pair it with shrinkage > 0: unregularised it "
                                            "over-fits small calibration sets badly)")
    calibration_batch_size: int = Field(4, ge=1, le=1024)
    calibration_windows: int | None = Field(None, ge=1, description="calibration windows the layer statistics "
                                            "use (the first N; default all): a later training stage may use more")
    sensitivity_windows: int = Field(16, ge=1, description="calibration windows used to measure sensitivities")

    @model_validator(mode="after")
    def _sublayer_needs_sequential(self):
        if self.sublayer and not self.sequential:
            raise ValueError("sublayer: true needs sequential: true")
        return self

