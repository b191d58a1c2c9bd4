from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..base import StageConfig


class LowRankConfig(StageConfig):
    """Truncated factorisation of each targeted Linear with the same parameter reduction everywhere."""

    method: Literal["lowrank"] = "lowrank"
    reduction: float = Field(gt=0, lt=1, description="fraction of each targeted matrix's parameters to remove")
    backend: Literal["svd"] = "svd"
    allocation: Literal["uniform"] = "uniform"
