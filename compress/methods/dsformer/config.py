from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ...training import Training
from ..base import DECODER_PROJECTIONS, StageConfig
from ..scaling import ScalingFields


class DSFormerConfig(ScalingFields, StageConfig):
    """DSFormer (arXiv 2312.13211): W ~= D S, D dense (m x k), S (k x n) with s non-zeros per column.

    The budget fixes m k + s n (values; indices are reported separately, or also counted with
    ``budget_unit: bytes``); ``sparsity`` (fraction of zeros in each column of S, default 0.75) or
    ``nnz_per_column`` (s directly) decides how it is split between k and s; ``pattern: "2:4"``
    forces s = k/2 in the 2-of-every-4-rows pattern. ``train`` (optional) trains D and S afterwards with the
    Straight-Through Factorizer (S a dense latent projected to its top-s entries per column in the forward).
    """

    method: Literal["dsformer"] = "dsformer"
    targets: list[str] = Field(default_factory=lambda: [DECODER_PROJECTIONS], min_length=1)
    reduction: float = Field(gt=0, lt=1, description="fraction of the targeted modules' parameters to remove")
    sparsity: float | None = Field(None, gt=0, lt=1, description="fraction of zeros per column of S (default 0.75)")
    nnz_per_column: int | None = Field(None, ge=1, description="s, the non-zeros per column of S")
    pattern: Literal["topk", "2:4"] = "topk"
    budget_unit: Literal["params", "bytes"] = Field(
        "params",
        description="params: values only (indices reported separately); bytes: an index costs "
        "index_bytes/value_bytes of a value, so the budget holds on disk too",
    )
    iters: int = Field(50, ge=0, le=10_000, description="alternating IHT / least-squares iterations")
    cg_steps: int = Field(4, ge=0, le=100, description="conjugate-gradient steps on S's support per iteration")
    seed: int = Field(0, description="seeds the extra random atoms when k exceeds the matrix rank")
    train: Training | None = Field(None, description="train the factors after the one-shot fit (default: no)")

    @model_validator(mode="after")
    def _one_split(self):
        if self.sparsity is not None and self.nnz_per_column is not None:
            raise ValueError("give at most one of 'sparsity' or 'nnz_per_column'")
        if self.pattern == "2:4" and (self.nnz_per_column is not None or self.sparsity not in (None, 0.5)):
            raise ValueError("pattern '2:4' fixes sparsity at 0.5; drop 'sparsity'/'nnz_per_column'")
        return self

    @property
    def column_sparsity(self) -> float:
        if self.pattern == "2:4":
            return 0.5
        return 0.75 if self.sparsity is None else self.sparsity
