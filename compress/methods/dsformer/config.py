from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from ..base import StageConfig


class FactorTrainingFields(BaseModel):
    """Optional training of the new factors on calibration text (shared by dsformer and lost).

    ``steps: 0`` = one-shot only. Training reuses the ``finetune`` method's accelerate loop with
    only this stage's factors trainable.
    """

    steps: int = Field(0, ge=0, le=1_000_000, description="training steps after the one-shot factorisation (0 = none)")
    lr: float = Field(1e-4, gt=0, le=1.0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(2, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_windows: int = Field(4, ge=1, description="calibration windows scored before and after training")
    seed: int = 0

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.steps and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self


class ScalingFields(BaseModel):
    """What the one-shot fit minimises.

    ``none``: ||W - W_hat||_F (data-free). ``activation``: ||(W - W_hat) diag(a)||_F with
    a_j = rms(x_j)^alpha (a diagonal scale keeps column supports, so it suits both dsformer's
    column-sparse S and lost's channel-sparse S_c). ``whiten``: the expected output error
    tr((W - W_hat) C (W - W_hat)^T) with C = E[x x^T] + shrinkage diag(E[x x^T]), the full input
    covariance. Statistics come from calibration windows, layer by layer (each layer sees the
    already-compressed layers before it).
    """

    scaling: Literal["none", "activation", "whiten"] = "none"
    alpha: float = Field(1.0, gt=0, le=2, description="activation scaling exponent: a_j = rms(x_j)^alpha "
                                                       "(1 = the diagonal of the input covariance)")
    shrinkage: float = Field(0.05, ge=0, le=10, description="whiten: add shrinkage * diag(C) to the covariance")
    scaling_windows: int = Field(32, ge=1, description="calibration windows used for the statistics (at most)")
    calibration_batch_size: int = Field(4, ge=1, le=1024)


class DSFormerConfig(FactorTrainingFields, ScalingFields, StageConfig):
    """DSFormer (arXiv 2312.13211): W ~= D S, D dense (m x k), S (k x n) with s non-zeros per column.

    The budget fixes m k + s n (values; indices are reported separately, or also counted with
    ``budget_unit: bytes``); ``sparsity`` (fraction of zeros in each column of S, default 0.75) or
    ``nnz_per_column`` (s directly) decides how it is split between k and s; ``pattern: "2:4"``
    forces s = k/2 in the 2-of-every-4-rows pattern.
    """

    method: Literal["dsformer"] = "dsformer"
    reduction: float = Field(gt=0, lt=1, description="fraction of the targeted modules' parameters to remove")
    sparsity: float | None = Field(None, gt=0, lt=1, description="fraction of zeros per column of S (default 0.75)")
    nnz_per_column: int | None = Field(None, ge=1, description="s, the non-zeros per column of S")
    pattern: Literal["topk", "2:4"] = "topk"
    budget_unit: Literal["params", "bytes"] = Field(
        "params", description="params: values only (indices reported separately); bytes: an index costs "
                              "index_bytes/value_bytes of a value, so the budget holds on disk too")
    iters: int = Field(50, ge=0, le=10_000, description="alternating IHT / least-squares iterations")
    cg_steps: int = Field(4, ge=0, le=100, description="conjugate-gradient steps on S's support per iteration")

    @model_validator(mode="after")
    def _one_split(self):
        if self.sparsity is not None and self.nnz_per_column is not None:
            raise ValueError("give at most one of 'sparsity' or 'nnz_per_column'")
        if self.pattern == "2:4" and (self.nnz_per_column is not None
                                      or self.sparsity not in (None, 0.5)):
            raise ValueError("pattern '2:4' fixes sparsity at 0.5; drop 'sparsity'/'nnz_per_column'")
        return self

    @property
    def column_sparsity(self) -> float:
        if self.pattern == "2:4":
            return 0.5
        return 0.75 if self.sparsity is None else self.sparsity
