from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..base import StageConfig
from ..dsformer.config import FactorTrainingFields, ScalingFields


class LostConfig(FactorTrainingFields, ScalingFields, StageConfig):
    """LOST (arXiv 2508.02668) for compression: W ~= U_r V_r + S_c, S_c = c whole input channels.

    The SVD's top-r components are kept as low-rank factors; the remaining spectrum's residual
    W - U_r V_r is kept exactly in the c input channels (columns) where it is largest.
    ``sparse_fraction`` of each matrix's kept parameters goes to S_c (c * out values), the rest to
    rank r. ``refine_iters`` alternates: refit the SVD on the channels S_c does not hold, re-pick.
    """

    method: Literal["lost"] = "lost"
    reduction: float = Field(gt=0, lt=1, description="fraction of the targeted modules' parameters to remove")
    sparse_fraction: float = Field(0.1, ge=0, lt=1, description="share of the kept parameters spent on S_c")
    refine_iters: int = Field(2, ge=0, le=100, description="SVD refits on the unselected channels (0 = plain LOST)")
