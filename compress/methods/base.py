"""What every method shares: its stage config base class and the two method shapes.

A *module method* decides per targeted module (``plan`` sees them all first, so global
choices such as WeLore's single threshold are possible) and then transforms one module
at a time, walked in decoder-layer order by the pipeline. A *model method* (training)
works on the whole model. Configs are frozen pydantic models; runtime state lives in
``StageContext``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..targets import check_patterns


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    targets: list[str] = Field(min_length=1, description="class names or 're:<regex>' on module names")
    ignore: list[str] = Field(default_factory=list)

    @field_validator("targets", "ignore")
    @classmethod
    def _valid_patterns(cls, patterns: list[str]) -> list[str]:
        errors = check_patterns(patterns)
        if errors:
            raise ValueError("; ".join(errors))
        return patterns


@dataclass
class StageContext:
    """Runtime state a stage may use: never part of the (frozen) config."""

    tokenizer: Any
    calibration_windows: Callable[[], torch.Tensor]  # lazy: data-free methods never build it
    progress: bool = True
    extras: dict = field(default_factory=dict)


@dataclass
class StageResult:
    """What a stage reports: per-module rows (for tables) and a free-form summary."""

    method: str
    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    series: dict = field(default_factory=dict)  # e.g. loss curves or spectra, for plots


class ModuleMethod:
    name: ClassVar[str]
    config_class: ClassVar[type[StageConfig]]
    summary: ClassVar[str]
    needs_activations: ClassVar[bool] = False

    def plan(self, modules: dict[str, nn.Module], config: StageConfig, ctx: StageContext) -> tuple[dict[str, Any], StageResult]:
        """Global decision per module name (None = leave it alone) and the stage's report."""
        raise NotImplementedError

    def apply(self, name: str, module: nn.Module, config: StageConfig, decision: Any, stats: dict | None) -> nn.Module:
        """Return the replacement for ``module`` (a pure function of its inputs)."""
        raise NotImplementedError


class ModelMethod:
    name: ClassVar[str]
    config_class: ClassVar[type[StageConfig]]
    summary: ClassVar[str]

    def run(self, model: nn.Module, config: StageConfig, ctx: StageContext) -> StageResult:
        raise NotImplementedError
