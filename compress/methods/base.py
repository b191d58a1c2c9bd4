"""The one protocol every method implements. The pipeline (compress/pipeline.py) drives it; no method walks
the model itself.

A method is a frozen, validated stage config (``config_class``) plus the hooks below, each declared here
with its default. ``level`` says which kind of work it does:

* ``"layers"``: it replaces modules inside decoder layers. ``plan`` sees every targeted module first
  (global choices: WeLore's threshold, a sensitivity allocation) and asks the pipeline for any
  measurement it needs through a ``Planner``. Then, one decoder layer at a time, the pipeline measures
  what ``calibration(config)`` declares and calls ``apply`` for each targeted module of that layer.
* ``"model"``: it changes model-level parts, not layers (the embedding and LM head, the tokenizer):
  ``apply_model`` receives exactly those parts (``ModelParts``) and what ``model_needs`` declared
  measured, and returns the new parts (``PartsUpdate``); the pipeline installs them.
* ``"training"``: it only trains (``finetune``).

Any method may declare a training step after compression (``training(config)``, a ``Training`` part of
its config): global (the whole model, compress/training.py's loop) or layer-local (each compressed layer
trained to reproduce the dense layer's output, inside the layer loop). ``trainable`` says which
parameters train and how (wrappers, parameter groups, a method's own loss).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..errors import CompressError
from ..targets import check_patterns

# The default targets of the methods that factorise Linears: every projection of every decoder layer.
DECODER_PROJECTIONS = r"re:.*\.(q|k|v|o|gate|up|down)_proj$"


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


# ---------------------------------------------------------------- what a method declares

Statistics = Literal["none", "input_cov", "dense_cross", "io"]


@dataclass(frozen=True)
class Calibration:
    """What a layer method needs measured for each targeted module, and how the stream is run.

    ``statistics``: ``none`` (data-free: no forward pass at all); ``input_cov`` (the module's input
    covariance ``cov``, mean |x| ``abs_mean`` and ``tokens``); ``dense_cross`` (also ``cross`` = E[x_dense
    x_current^T] against a parallel dense stream, with ``sequential``); ``io`` (the module's input and
    output tokens, ``inputs``/``outputs`` [N, d]). ``sequential``: layer i is measured on the outputs of the
    already-compressed layers < i; ``sublayer``: also inside a layer, modules grouped by shared input in
    call order (q/k/v, then o, then gate/up, then down). ``windows``: at most this many calibration windows.
    ``output_side``: the method reads ``cross`` only as ``W cross`` (W: the module's weight): where that is less
    work to measure (a module alone in the last group of a sub-layer walk, with fewer outputs than inputs),
    ``stats`` hold ``target_cross`` = W cross instead.
    """

    statistics: Statistics = "none"
    sequential: bool = True
    sublayer: bool = False
    windows: int | None = None
    batch_size: int = 4
    output_side: bool = False


@dataclass(frozen=True)
class ModelNeeds:
    """What a model-level method needs measured on the calibration windows."""

    token_counts: bool = False  # occurrences of every token id
    head_input_cov_windows: int | None = None  # covariance of the hidden states entering the LM head


# ---------------------------------------------------------------- what a method receives and returns


@dataclass
class StageContext:
    """Runtime state of a run (never part of the frozen configs)."""

    tokenizer: Any
    calibration_windows: Callable[[], torch.Tensor | None]  # lazy: data-free methods never build them
    progress: bool = True
    teacher: nn.Module | None = None  # the model before the first stage, when a stage distils towards it
    storage_dtype: torch.dtype | None = None  # what the checkpoint is saved in (None: the model's own dtype)
    layer_store: Any = None  # a streamed model's layers (compress.streaming.StreamedLayers); None: in memory
    activation_dtype: torch.dtype | None = None  # the calibration streams' dtype between layers (None: the model's)
    statistics_dtype: torch.dtype = torch.float64  # each batch's input products (summed in float64)
    compute_dtype: torch.dtype = torch.float32  # the calibration passes' matrix products (autocast)
    activation_storage: str = "device"  # where the layer walk holds its hidden states (compress.offload)


@dataclass
class StageResult:
    """What a stage reports: per-module rows (for tables) and a free-form summary."""

    method: str
    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    series: dict = field(default_factory=dict)  # e.g. loss curves or spectra, for plots


@dataclass
class Plan:
    """A layer method's global decision per targeted module (None = leave it alone) and its report."""

    decisions: dict[str, Any]
    result: StageResult
    # further calibration streams, each the model as one selection of the replaced modules would run it
    # ({module name: rank, None = its stored dense matrix}); their statistics are pooled with the main stream's,
    # or (``streams_pooled=False``) handed to ``apply`` apart, as ``stats["variants"][j]`` for selection j
    stream_selections: list[dict[str, int | None]] = field(default_factory=list)
    streams_pooled: bool = True


@dataclass
class Replacement:
    """The module that replaces a targeted one, and numbers for its report row (e.g. the fit's error)."""

    module: nn.Module
    info: dict = field(default_factory=dict)


class Planner:
    """What ``plan`` may ask the pipeline for. Implemented by the pipeline (it owns the model); a method
    never sees the model itself."""

    @property
    def model_config(self):
        """The model's (read-only) config, e.g. for its number of KV heads."""
        raise NotImplementedError

    def windows(self, limit: int | None = None) -> torch.Tensor:
        """The calibration windows ([N, seq_len] token ids), at most ``limit`` of them."""
        raise NotImplementedError

    def stored_value_bytes(self, module: nn.Module) -> int:
        """Bytes per weight value in the saved checkpoint (the work itself runs in float32)."""
        raise NotImplementedError

    def progress(self, items, description: str):
        """``items`` with a progress bar when the run shows progress."""
        raise NotImplementedError

    def map_sensitivity_statistics(
        self,
        modules: dict[str, nn.Module],
        fn: Callable[[str, nn.Module, dict, torch.Tensor], Any],
        windows: torch.Tensor,
        batch_size: int,
        output_side: bool = False,
    ) -> dict[str, Any]:
        """``{name: fn(name, module, stats, fisher)}`` with each module's dense input statistics
        (``input_cov``) and ``fisher``: the mean squared gradient of the token loss w.r.t. each of its output
        channels; both measured on one walk over the decoder layers (one layer's statistics held at once).
        ``output_side``: ``fn`` reads ``cov`` only as ``W cov W^T`` and its diagonal: a module alone on its input
        with fewer outputs than inputs gets ``output_cov`` (the outputs' second moment, bias removed) and
        ``input_power`` (cov's diagonal) instead, less work to measure."""
        raise NotImplementedError


@dataclass
class ModelParts:
    """The model-level parts a ``"model"`` method works on (nothing else of the model)."""

    embedding_name: str
    embedding: nn.Module
    head_name: str | None
    head: nn.Module | None
    tied: bool  # the head's weight is the embedding's weight
    tokenizer: Any
    config: Any  # the model config (read-only: token ids, vocabulary size)
    generation_config: Any


@dataclass
class ModelStats:
    token_counts: torch.Tensor | None = None
    head_input_cov: torch.Tensor | None = None


@dataclass
class PartsUpdate:
    """New model-level parts; ``None`` keeps a part as it is."""

    embedding: nn.Module | None = None
    head: nn.Module | None = None
    tokenizer: Any = None
    untie: bool = False  # the tie now lives in compress modules, or was broken on purpose
    config: dict = field(default_factory=dict)  # model config fields to set
    generation_config: dict = field(default_factory=dict)  # generation config fields to set


@dataclass
class TrainingSetup:
    """What ``trainable`` hands the training loop: parameter groups, optionally the method's own loss
    (default: the ``Training.loss`` on calibration text), and extra curves / summary it fills."""

    param_groups: list[dict]
    loss_fn: Callable | None = None
    series: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    inference_view: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


# ---------------------------------------------------------------- the protocol


class Method:
    name: ClassVar[str]
    config_class: ClassVar[type[StageConfig]]
    summary: ClassVar[str]
    level: ClassVar[Literal["layers", "model", "training"]] = "layers"

    # -- layer methods
    def calibration(self, config: StageConfig) -> Calibration:
        """What ``apply`` needs measured per module (default: nothing, data-free)."""
        return Calibration()

    def plan(self, modules: dict[str, nn.Module], config: StageConfig, planner: Planner) -> Plan:
        """Decide for every targeted module at once (None = leave it alone) and start the report."""
        raise NotImplementedError(f"{self.name} is not a layer method")

    def apply(
        self, name: str, module: nn.Module, config: StageConfig, decision: Any, stats: dict | None
    ) -> Replacement:
        """The replacement of one targeted module (a pure function of its arguments)."""
        raise NotImplementedError(f"{self.name} is not a layer method")

    def summarise(self, result: StageResult, config: StageConfig) -> None:
        """Complete the report once every layer is done (rows carry what ``apply`` measured)."""

    def streams(self, config: StageConfig) -> bool:
        """Whether the stage runs on a model streamed one decoder layer at a time: ``plan`` reads only the
        modules' shapes (no weights, no whole-model measurement) and nothing trains the whole model."""
        return False

    # -- model-level methods
    def model_needs(self, config: StageConfig) -> ModelNeeds:
        return ModelNeeds()

    def apply_model(self, parts: ModelParts, config: StageConfig, stats: ModelStats) -> tuple[PartsUpdate, StageResult]:
        raise NotImplementedError(f"{self.name} is not a model-level method")

    # -- training
    def training(self, config: StageConfig) -> Any:
        """The stage's ``Training`` part, or None (no training). Default: the config's ``train`` block."""
        return getattr(config, "train", None)

    def needs_teacher(self, config: StageConfig) -> bool:
        training = self.training(config)
        return training is not None and training.loss == "distill"

    @contextlib.contextmanager
    def trainable(self, root: nn.Module, names: list[str], config: StageConfig, training) -> Iterator[TrainingSetup]:
        """Make the modules ``names`` of ``root`` trainable for the duration of the block (default: every
        parameter of them, at ``training.lr``; the next-token or distillation loss)."""
        params = []
        for name in names:
            module = root.get_submodule(name)
            module.requires_grad_(True)
            params += [p for p in module.parameters() if p.requires_grad]
        params = list({id(p): p for p in params}.values())  # a tied parameter trains once
        if not params:
            raise CompressError(f"{self.name}: the modules to train have no parameters")
        try:
            yield TrainingSetup([{"params": params, "lr": training.lr}])
        finally:
            root.requires_grad_(False)


# ---------------------------------------------------------------- helpers layer methods share


def check_linear(method: str, name: str, module: nn.Module) -> None:
    if not isinstance(module, nn.Linear):
        raise CompressError(f"{method}: {name} is a {type(module).__name__}, not a Linear")


def budget_summary(rows: list[dict], requested: float | None) -> dict:
    """Requested and achieved fraction of the targeted parameters removed, from the rows' counts."""
    before = sum(r["params_before"] for r in rows)
    after = sum(r["params_after"] for r in rows)
    return {
        "requested_reduction": requested,
        "achieved_reduction": 1 - after / before if before else 0.0,
        "targeted_params_before": before,
        "targeted_params_after": after,
    }


def summarise_factors(result: StageResult, reduction: float) -> None:
    """The summary of a stage whose rows say whether a matrix was ``replaced`` and how many ``index_bytes``
    its sparse part stores (dsformer, LOST): budget, index bytes, counts, and the fits' mean errors once
    ``apply`` has recorded them."""
    rows = result.rows
    replaced = [r for r in rows if r["replaced"]]
    result.summary.update(
        {
            **budget_summary(rows, reduction),
            "index_bytes": sum(r["index_bytes"] for r in rows),
            "replaced": len(replaced),
            "kept_dense": len(rows) - len(replaced),
        }
    )
    fitted = [r for r in replaced if "rel_error" in r]
    if fitted:
        result.summary["mean_rel_error"] = sum(r["rel_error"] for r in fitted) / len(fitted)
        result.summary["mean_svd_rel_error"] = sum(r["svd_rel_error"] for r in fitted) / len(fitted)
