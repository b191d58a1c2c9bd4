"""What dsformer's and LOST's one-shot fits minimise: the config part and the weights it gives the factorisers."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field

from ..lowrank_math import shrink
from .base import Calibration


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
    alpha: float = Field(
        1.0,
        gt=0,
        le=2,
        description="activation scaling exponent: a_j = rms(x_j)^alpha (1 = the diagonal of the input covariance)",
    )
    shrinkage: float = Field(0.05, ge=0, le=10, description="whiten: add shrinkage * diag(C) to the covariance")
    scaling_windows: int = Field(32, ge=1, description="calibration windows used for the statistics (at most)")
    calibration_batch_size: int = Field(4, ge=1, le=1024)

    def scaling_calibration(self) -> Calibration:
        if self.scaling == "none":
            return Calibration()
        return Calibration(statistics="input_cov", windows=self.scaling_windows, batch_size=self.calibration_batch_size)


def fit_weights(stats: dict | None, config: ScalingFields) -> dict:
    """Keyword arguments for the factorisers: ``scale`` (activation), ``cov`` (whiten) or nothing."""
    if config.scaling == "activation":
        return {"scale": input_scale(stats, config.alpha)}
    if config.scaling == "whiten":
        return {"cov": shrink(stats["cov"], stats["cov"], config.shrinkage, ridge=1e-8)}
    return {}


def input_scale(stats: dict | None, alpha: float) -> torch.Tensor | None:
    """a_j = rms(x_j)^alpha, normalised to mean 1, floored at 1e-3 (dead channels keep some weight)."""
    if stats is None:
        return None
    rms = stats["cov"].diagonal().clamp_min(0).sqrt().to(torch.float64)
    scale = rms.pow(alpha)
    scale = scale / scale.mean().clamp_min(1e-30)
    return scale.clamp_min(1e-3)
