"""Recipes: YAML -> a validated, frozen ``Recipe`` before any model is loaded.

Stage configs come from the method registry and are told apart by their ``method``
field (a pydantic discriminated union), so each method owns its own fields and errors
carry the field path, e.g. ``stages[0].reduction``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from .errors import CompressError
from .eval.corpora import CORPORA
from .models import HUB_ID
from .registry import all_methods, suggest

# Eval tasks: compress's own (compress.eval.lm_eval_runner.TASKS) or any task lm-eval knows, checked by name
# (and their datasets by availability) before a run starts: compress.eval.lm_eval_runner.check_tasks.
Corpus = Literal[CORPORA]  # the bundled corpora


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationSource(_Strict):
    """One source of calibration text: a bundled ``corpus``, a Hugging Face ``dataset`` or a local ``file``."""

    corpus: Corpus | None = Field(None, description="a bundled corpus (its calibration split)")
    dataset: str | None = Field(None, description="a Hugging Face dataset id (or local dataset folder)")
    config: str | None = Field(None, description="the dataset's configuration name")
    split: str = "train"
    file: str | None = Field(None, description="a local .txt, .jsonl, .json or .parquet file")
    text_field: str = Field("text", description="the field holding the text")
    messages_field: str | None = Field(
        None,
        description="a field of {role, content} messages, rendered with "
        "the tokenizer's chat template (instead of text_field)",
    )
    max_documents: int | None = Field(None, ge=1, description="use only the first N documents (records) of the source")
    weight: float = Field(1.0, gt=0, description="share of the windows, relative to the other sources")

    @model_validator(mode="after")
    def _one_origin(self):
        given = [name for name in ("corpus", "dataset", "file") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of corpus, dataset or file")
        if self.file is not None and not Path(self.file).expanduser().is_file():
            raise ValueError(f"calibration file {self.file!r} does not exist")
        return self

    def describe(self) -> str:
        if self.corpus is not None:
            return f"{self.corpus} (bundled, calibration split)"
        where = (
            f"dataset {self.dataset}" + (f" [{self.config}]" if self.config else "") + f" split {self.split}"
            if self.dataset is not None
            else f"file {self.file}"
        )
        return f"{where}, field {self.messages_field or self.text_field}" + (
            " (chat template)" if self.messages_field else ""
        )


# Without a corpus or sources: text of two unlike domains, so the compressed model is not fitted to one.
DEFAULT_SOURCES = (
    CalibrationSource(corpus="wikipedia", weight=0.5),
    CalibrationSource(corpus="shakespeare", weight=0.5),
)


class CalibrationConfig(_Strict):
    corpus: Corpus | None = Field(None, description="shorthand for sources: [{corpus: ...}]")
    sources: list[CalibrationSource] | None = Field(None, min_length=1, description="a weighted mix of sources")
    samples: int = Field(64, ge=1, le=100_000, description="number of calibration windows")
    seq_len: int = Field(512, ge=8, le=32_768)
    activation_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="the dtype the calibration windows' hidden states are held in between layers (half the "
        "memory in bf16; each layer still computes in float32); auto: bfloat16 on a GPU, float32 on CPU",
    )
    activation_storage: Literal["auto", "device", "cpu", "disk"] = Field(
        "auto",
        description="where the layer walk holds the calibration windows' hidden states (each stream, a layer's "
        "dense outputs, a sub-layer pass's kept inputs): device = where the layers compute; cpu = host memory "
        "(from a GPU); disk = files in the temporary folder (TMPDIR), read back batch by batch: memory then holds "
        "one batch of them. The same model whatever the place. auto: the device when 8 streams' worth fit in "
        "half its free memory, else host memory, else disk",
    )
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="the dtype of the calibration passes' matrix products (torch.autocast: the layers' forward "
        "passes, and the sensitivity pass's backward); the weights, the statistics' products and the "
        "factorisations stay in their own dtypes. bfloat16 is 2.5x faster per product on a CPU with AVX512-BF16 "
        "(or AMX) and on a GPU; it rounds the hidden states the statistics are measured on",
    )
    statistics_dtype: Literal["float64", "float32"] = Field(
        "float64",
        description="the dtype of each batch's input products (x x^T, and the dense-target cross products); "
        "their sums over batches are float64 either way. float32 is about twice as fast on CPU; each product's "
        "rounding error is then at most tokens x 2^-24 (typically sqrt(tokens) x 2^-24) of sum |x_i||x_j|, "
        "tokens = calibration_batch_size x seq_len",
    )

    @model_validator(mode="after")
    def _corpus_or_sources(self):
        if self.corpus is not None and self.sources is not None:
            raise ValueError("give corpus or sources, not both")
        if len(self.resolved_sources()) > self.samples:
            raise ValueError(f"{len(self.resolved_sources())} sources need at least as many samples")
        return self

    def resolved_sources(self) -> list[CalibrationSource]:
        """The sources in use: ``sources``, the one ``corpus``, or the default mix."""
        if self.sources is not None:
            return list(self.sources)
        if self.corpus is not None:
            return [CalibrationSource(corpus=self.corpus)]
        return list(DEFAULT_SOURCES)


class EvalConfig(_Strict):
    tasks: list[str] = Field(
        default_factory=lambda: ["wikipedia_ppl"],
        description="compress's tasks or any lm-eval task/group (hellaswag, arc_easy, mmlu ...)",
    )
    compare_dense: bool = True
    # token-level held-out perplexity (README, "Measurement protocol"); None = every held-out window
    perplexity_windows: int | None = Field(None, ge=1)
    # the corpora it is measured on (their held-out split); the first is the run's headline number
    perplexity_corpora: list[Corpus] = Field(default_factory=lambda: ["wikipedia"], min_length=1)
    # elastic models: also the held-out perplexity (first corpus) at each of these reductions
    budgets: list[float] | None = Field(None, min_length=1)
    seq_len: int = Field(512, ge=8, le=32_768)
    # lm-eval documents per task: one number for every task, or {task: n}; None = all
    limit: int | dict[str, int] | None = Field(None)
    # few-shot examples per task: one number for every task, or {task: n}; None = each task's own default
    num_fewshot: int | dict[str, int] | None = Field(None)
    # lm-eval's rolling-window length; the model's own maximum (8192 here) costs GBs of logits on CPU
    lm_eval_max_length: int = Field(2048, ge=16, le=131_072)
    # a streamed run's lm-eval tasks and budgets: memory (GiB) for the checkpoint's weights, the rest read from
    # its shards as each layer runs (accelerate's device_map="auto"); None = what the machine has free
    max_memory_gib: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent_tasks(self):
        for task in self.tasks:
            if not re.fullmatch(r"[\w.-]+", task):
                raise ValueError(f"{task!r} is not a task name")
        for field, minimum in (("limit", 1), ("num_fewshot", 0)):
            value = getattr(self, field)
            per_task = value if isinstance(value, dict) else {}
            for task in per_task:
                if task not in self.tasks:
                    raise ValueError(f"{field} for {task!r}, which is not in tasks{suggest(task, self.tasks)}")
            values = per_task.values() if per_task else ([value] if value is not None else [])
            if any(v < minimum for v in values):
                raise ValueError(f"{field} must be >= {minimum}")
        if self.budgets is not None and not all(0 < b < 1 for b in self.budgets):
            raise ValueError("budgets are reductions in (0, 1)")
        return self

    def limit_for(self, task: str) -> int | None:
        return self.limit.get(task) if isinstance(self.limit, dict) else self.limit

    def num_fewshot_for(self, task: str) -> int | None:
        return self.num_fewshot.get(task) if isinstance(self.num_fewshot, dict) else self.num_fewshot


class PushConfig(_Strict):
    repo_id: str = Field(pattern=HUB_ID.pattern)
    private: bool = True
    revision: str | None = None


class OutputConfig(_Strict):
    # auto: the dtype the source checkpoint declares (bf16 for most hub models); the work itself (statistics,
    # factorisations, training) is always float32 or float64
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    push_to_hub: PushConfig | None = None


def _stage_union():
    configs = tuple(method.config_class for method in all_methods().values())
    return Annotated[Union[configs], Field(discriminator="method")]  # noqa: UP007


@functools.cache
def recipe_model() -> type[BaseModel]:
    """The Recipe pydantic model, built once the method registry is loaded."""
    return create_model(
        "Recipe",
        __config__=ConfigDict(extra="forbid", frozen=True),
        name=(str, Field(pattern=r"^[A-Za-z0-9][\w.-]*$")),
        description=(str, ""),
        stages=(list[_stage_union()], Field(min_length=1)),
        calibration=(CalibrationConfig, CalibrationConfig()),
        eval=(EvalConfig, EvalConfig()),
        output=(OutputConfig, OutputConfig()),
    )


def _where(loc: tuple) -> str:
    """('stages', 0, 'welore', 'reduction') -> 'stages[0].reduction' (drop the union tag)."""
    methods = all_methods()
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts[-1] += f"[{item}]" if parts else f"[{item}]"
        elif item in methods and i > 0 and isinstance(loc[i - 1], int):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts) or "recipe"


def format_error(error: ValidationError) -> str:
    """One line: the first problem with its field path, and how many more there are."""
    errors = error.errors()
    first = errors[0]
    if first["type"] == "union_tag_invalid":
        tag = first["ctx"]["tag"]
        message = f"unknown method {tag!r}{suggest(tag, all_methods())}; known: {first['ctx']['expected_tags']}"
        where = _where(first["loc"]) + ".method"
    elif first["type"] == "union_tag_not_found":
        message, where = "missing 'method'", _where(first["loc"])
    else:
        message = first["msg"].removeprefix("Value error, ")
        where = _where(first["loc"])
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        if (
            "input" in first
            and first["type"] not in ("missing", "extra_forbidden")
            and not isinstance(first["input"], dict)
        ):
            message += f" (got {first['input']!r})"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {message}{more}"


def parse_recipe(data: dict, source: str = "recipe"):
    if not isinstance(data, dict):
        raise CompressError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return recipe_model().model_validate(data)
    except ValidationError as exc:
        raise CompressError(f"{source}: {format_error(exc)}") from None


def bundled_recipes() -> dict[str, Path]:
    """The recipes shipped inside the package: name (file stem) -> file."""
    import importlib.resources

    folder = importlib.resources.files("compress.bundled_recipes")
    return {Path(item.name).stem: Path(str(item)) for item in folder.iterdir() if item.name.endswith(".yaml")}


def resolve_recipe(ref: str | Path) -> Path:
    """A recipe file: ``ref`` itself when it is a file, else the bundled recipe of that name (``lowrank-20``)."""
    path = Path(ref)
    if path.is_file():
        return path
    bundled = bundled_recipes()
    name = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and name in bundled:
        return bundled[name]
    raise CompressError(
        f"recipe {str(ref)!r} does not exist: not a file, nor a bundled recipe"
        f"{suggest(name, bundled)} (bundled: {', '.join(sorted(bundled))})"
    )


def load_recipe(ref: str | Path):
    """Parse and validate a recipe file, or a bundled recipe given by name."""
    path = resolve_recipe(ref)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise CompressError(f"{path}:{line} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    return parse_recipe(data, str(path))


def recipe_to_yaml(recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
