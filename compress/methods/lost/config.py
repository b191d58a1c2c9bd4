from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ...training import Training
from ..base import DECODER_PROJECTIONS, StageConfig
from ..scaling import ScalingFields


class LostConfig(ScalingFields, StageConfig):
    """LOST (arXiv 2508.02668) for compression: W ~= U_r V_r + S_c, S_c = c whole input channels.

    The SVD's top-r components are kept as low-rank factors; the remaining spectrum's residual
    W - U_r V_r is kept exactly in the c input channels (columns) where it is largest.
    ``sparse_fraction`` of each matrix's kept parameters goes to S_c (c * out values), the rest to
    rank r; ``"auto"`` picks, per matrix, the split with the lowest (scaled) error of plain LOST,
    scored exactly from one SVD (c = 0, i.e. plain SVD, is a candidate). ``refine_iters`` alternates: refit the
    SVD on the channels S_c does not hold, re-pick.
    """

    method: Literal["lost"] = "lost"
    targets: list[str] = Field(default_factory=lambda: [DECODER_PROJECTIONS], min_length=1)
    reduction: float = Field(gt=0, lt=1, description="fraction of the targeted modules' parameters to remove")
    sparse_fraction: float | str = Field(
        0.1, description="share of the kept parameters spent on S_c (0 <= f < 1), or 'auto' (best split per matrix)"
    )
    refine_iters: int = Field(2, ge=0, le=100, description="SVD refits on the unselected channels (0 = plain LOST)")
    train: Training | None = Field(None, description="train U, V and S_c's values afterwards (channels fixed)")

    @field_validator("sparse_fraction")
    @classmethod
    def _fraction_or_auto(cls, value):
        if isinstance(value, str):
            if value != "auto":
                raise ValueError("must be a number in [0, 1) or 'auto'")
        elif not 0 <= value < 1:
            raise ValueError("must be in [0, 1)")
        return value
