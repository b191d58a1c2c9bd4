"""Score an in-memory model with lm-eval: compress's offline tasks, or any task lm-eval knows.

Any name in lm-eval's ``TaskManager`` works (hellaswag, arc_easy, mmlu, gsm8k, wikitext, ...): its
dataset comes from the Hugging Face datasets cache or the hub, and :func:`check_tasks` makes sure, before
any heavy work, that every name exists and every dataset can be loaded (offline: that it is cached).

compress's own tasks are lm-eval YAMLs shipped as templates in ``eval/tasks/``. At run time their data
(JSONL built from the held-out corpora) and the YAMLs, with the absolute data path filled in,
are written to ``compress_cache_dir()/lm_eval/v<N>/`` and loaded with
``TaskManager(include_path=<that dir>)``. Nothing touches the network
(``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``).

Tasks:

* ``wikipedia_ppl`` -- loglikelihood_rolling over the held-out Wikipedia articles
  (word_perplexity, byte_perplexity, bits_per_byte; lm-eval's word/byte normalisation,
  NOT the token-level perplexity of :mod:`compress.eval.perplexity`).
* ``shakespeare_ppl`` -- the same on held-out Shakespeare plays cut into ~2,000-word chunks
  (domain shift).
* ``wikipedia_lastword`` -- LAMBADA-style last-word prediction on held-out Wikipedia
  passages (acc = whole target word is the greedy continuation; perplexity = exp(-mean
  log-likelihood of the target word)).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

from .cache import atomic_write_text, compress_cache_dir
from .corpora import load_records

__all__ = [
    "TASKS",
    "available_tasks",
    "build_task_data",
    "check_tasks",
    "prepare_tasks",
    "run_lm_eval",
]

TASKS = ("wikipedia_ppl", "shakespeare_ppl", "wikipedia_lastword")

# Bump when the generated data or the templates change (a new folder is rendered).
_TASK_DATA_VERSION = 1
_TEMPLATE_DIR = Path(__file__).resolve().parent / "tasks"
_PLACEHOLDER = "__DATA_FILE__"

SHAKESPEARE_CHUNK_WORDS = 2000  # a chunk closes at the first line end after this many words
SHAKESPEARE_CHUNKS_PER_PLAY = 3  # 10 held-out plays -> 30 documents, ~60k words
LASTWORD_MIN_SENTENCES = 6
LASTWORD_MAX_SENTENCES = 8
LASTWORD_MAX_EXAMPLES = 300

_ABBREVIATIONS = {
    "etc",
    "inc",
    "ltd",
    "corp",
    "bros",
    "esq",
    "col",
    "gen",
    "gov",
    "sgt",
    "rev",
    "jan",
    "feb",
    "mar",
    "apr",
    "jun",
    "jul",
    "aug",
    "sep",
    "sept",
    "oct",
    "nov",
    "dec",
    "mrs",
    "vol",
    "vols",
    "approx",
    "fig",
    "figs",
    "nos",
    "ibid",
    "cf",
}
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_LAST_WORD_RE = re.compile(r"(?:^|\s)([A-Za-z]{3,})\.$")


def available_tasks() -> list[str]:
    """compress's own task names (any lm-eval task name is accepted as well)."""
    return list(TASKS)


def _check_tasks(tasks) -> list[str]:
    """compress's own tasks among ``tasks`` (which must all be ours)."""
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"no task given; valid tasks: {', '.join(TASKS)}")
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; valid tasks: {', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))  # de-duplicated, order kept


# --------------------------------------------------------------------------- task data
def _shakespeare_chunks() -> list[dict]:
    per_play: list[list[dict]] = []
    for rec in load_records("shakespeare", "heldout"):
        chunks, lines, words = [], [], 0
        for line in rec["text"].split("\n"):
            lines.append(line)
            words += len(line.split())
            if words >= SHAKESPEARE_CHUNK_WORDS:
                chunks.append("\n".join(lines).strip())
                lines, words = [], 0
                if len(chunks) == SHAKESPEARE_CHUNKS_PER_PLAY:
                    break
        if len(chunks) < SHAKESPEARE_CHUNKS_PER_PLAY and words and "\n".join(lines).strip():
            chunks.append("\n".join(lines).strip())
        per_play.append([{"title": rec["title"], "chunk": i, "text": c} for i, c in enumerate(chunks)])
    return _round_robin(per_play)


def _round_robin(groups: list[list[dict]], cap: int | None = None) -> list[dict]:
    """Interleave per-document lists (so ``limit=k`` spans k different documents)."""
    out: list[dict] = []
    depth = max((len(g) for g in groups), default=0)
    for i in range(depth):
        for g in groups:
            if i < len(g):
                out.append(g[i])
                if cap is not None and len(out) >= cap:
                    return out
    return out


def _is_prose(line: str) -> bool:
    return len(line) >= 100 and line.rstrip().endswith((".", "!", "?", '"'))


def _lastword_examples() -> list[dict]:
    per_article: list[list[dict]] = []
    for rec in load_records("wikipedia", "heldout"):
        examples, window = [], []
        for line in rec["text"].split("\n"):
            if not _is_prose(line):
                if line.strip():  # a heading or list item breaks the passage
                    window = []
                continue
            for sentence in _SENTENCE_SPLIT_RE.split(line.strip()):
                sentence = " ".join(sentence.split())
                if not sentence:
                    continue
                window.append(sentence)
                if len(window) > LASTWORD_MAX_SENTENCES:
                    window.pop(0)
                m = _LAST_WORD_RE.search(sentence)
                if len(window) >= LASTWORD_MIN_SENTENCES and m and m.group(1).lower() not in _ABBREVIATIONS:
                    text = " ".join(window)[:-1]  # drop the final period
                    context, _, word = text.rpartition(" ")
                    examples.append({"title": rec["title"], "text": text, "context": context, "target": " " + word})
                    window = []
        per_article.append(examples)
    return _round_robin(per_article, cap=LASTWORD_MAX_EXAMPLES)


def build_task_data(task: str) -> list[dict]:
    """The documents of ``task`` as lm-eval will read them (deterministic)."""
    (task,) = _check_tasks([task])
    if task == "wikipedia_ppl":
        return [{"title": r["title"], "text": r["text"]} for r in load_records("wikipedia", "heldout")]
    if task == "shakespeare_ppl":
        return _shakespeare_chunks()
    return _lastword_examples()


def _write_if_changed(path: Path, text: str) -> None:
    # Keeping an unchanged file untouched keeps its mtime, hence the datasets cache, valid.
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)


def prepare_tasks(tasks) -> Path:
    """Render data and YAMLs of ``tasks`` into the cache; returns the folder to include."""
    names = _check_tasks(tasks)
    root = compress_cache_dir() / "lm_eval" / f"v{_TASK_DATA_VERSION}"
    data_dir, task_dir = root / "data", root / "tasks"
    for name in names:
        data_path = (data_dir / f"{name}.jsonl").resolve()
        records = build_task_data(name)
        _write_if_changed(data_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        template = (_TEMPLATE_DIR / f"{name}.yaml").read_text(encoding="utf-8")
        if _PLACEHOLDER not in template:
            raise RuntimeError(f"task template {name}.yaml lacks the {_PLACEHOLDER} placeholder")
        # a JSON string is a valid YAML double-quoted scalar: safe for any path
        rendered = template.replace(_PLACEHOLDER, json.dumps(str(data_path)))
        _write_if_changed(task_dir / f"{name}.yaml", rendered)
    return task_dir


# --------------------------------------------------------------------------- lm-eval's own tasks
_MANAGERS: dict = {}


def _task_manager(ours: tuple[str, ...] = ()):
    """lm-eval's TaskManager, with those of our tasks that are asked for (a run of lm-eval's own tasks does
    not need our corpora installed). Indexing lm-eval's ~15k task files takes seconds: once per set."""
    if ours not in _MANAGERS:
        import logging

        from lm_eval.tasks import TaskManager

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        include = str(prepare_tasks(ours)) if ours else None
        _MANAGERS[ours] = TaskManager(include_path=include, include_defaults=True)
    return _MANAGERS[ours]


def check_tasks(tasks) -> None:
    """Every name is a task or group lm-eval knows (or ours), and every dataset loads, before any heavy work.

    Offline (``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``) a dataset must already be in the Hugging Face
    datasets cache; online it is downloaded into that cache now. Raises ``CompressError`` with one line.
    """
    import difflib

    from compress.errors import CompressError
    from compress.utils import require

    foreign = [t for t in dict.fromkeys(tasks) if t not in TASKS]
    if not foreign:
        return
    require("lm_eval", "eval", "evaluating lm-eval tasks")
    manager = _task_manager()
    known = set(manager.all_tasks) | set(TASKS)  # ours too, for the "did you mean"
    for task in foreign:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CompressError(
                f"unknown eval task {task!r}{hint}: not one of compress's tasks "
                f"({', '.join(TASKS)}) nor a task or group lm-eval knows"
            )
    from lm_eval.tasks import get_task_dict

    for task in foreign:
        try:
            get_task_dict([task], manager)
        except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            offline = any(os.environ.get(k, "") not in ("", "0") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
            why = "it is not in the Hugging Face datasets cache (offline mode)" if offline else "it could not be loaded"
            raise CompressError(f"eval task {task!r}: its dataset is not available, {why}: {first}") from None


# --------------------------------------------------------------------------- running
_NOT_METRICS = {"alias", "sample_len", "samples"}


def _flatten(results: dict, names: list[str]) -> dict[str, dict[str, float]]:
    flat: dict[str, dict[str, float]] = {}
    for name in names:
        metrics: dict[str, float] = {}
        for key, value in results.get(name, {}).items():
            if key in _NOT_METRICS or isinstance(value, (str, bool)) or value is None:
                continue  # "N/A" stderrs, alias, sample count
            metric, _, filt = key.partition(",")
            if filt and filt != "none":
                metric = f"{metric},{filt}"
            metrics[metric] = float(value)
        flat[name] = metrics
    return flat


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    bootstrap_iters: int = 0,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate the in-memory ``model`` on lm-eval ``tasks`` (compress's offline ones or any lm-eval knows).

    ``limit`` keeps the first ``limit`` documents of each task (documents are interleaved
    across articles/plays, so small limits still cover several sources). ``max_length``
    overrides the context length lm-eval derives from the model config (rolling windows for
    the perplexity tasks). ``bootstrap_iters > 0`` adds ``<metric>_stderr`` entries
    (lm-eval's closed form for acc, a bootstrap in a process pool for perplexity).

    Returns ``{task: {metric: value}}`` with lm-eval's ``,none`` filter suffix stripped, e.g.
    ``{"wikipedia_ppl": {"word_perplexity": ..., "byte_perplexity": ..., "bits_per_byte": ...}}``.
    """
    names = list(dict.fromkeys([tasks] if isinstance(tasks, str) else tasks))
    if not names:
        raise ValueError(f"no task given; compress's tasks: {', '.join(TASKS)}")
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if any(name not in TASKS for name in names):  # lm-eval's own tasks: datasets from the cache or the hub
        return _evaluate(
            model,
            tokenizer,
            names,
            _task_manager(tuple(name for name in names if name in TASKS)),
            limit,
            batch_size,
            max_length,
            bootstrap_iters,
            num_fewshot,
        )
    from lm_eval.tasks import TaskManager

    include_dir = prepare_tasks(names)
    # lm-eval must never reach the hub: our tasks read local files. Restored afterwards so a
    # later hub push (or a subprocess) in the same run is not silently offline.
    saved_env = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update({key: "1" for key in saved_env})
    try:
        manager = TaskManager(include_path=str(include_dir), include_defaults=False)
        return _evaluate(model, tokenizer, names, manager, limit, batch_size, max_length, bootstrap_iters, num_fewshot)
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _evaluate(model, tokenizer, names, task_manager, limit, batch_size, max_length, bootstrap_iters, num_fewshot):
    import logging

    import lm_eval
    import torch

    # lm-eval warns about passing an in-memory model, which is exactly what we mean to do
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from lm_eval.models.huggingface import HFLM

    was_training = getattr(model, "training", False)
    # HFLM sets a pad token on the tokenizer it is given: hand it a copy
    tokenizer = copy.deepcopy(tokenizer)
    # HFLM calls model.tie_weights(), which would re-tie an embedding/lm_head pair that a
    # compression step deliberately untied or replaced; the in-memory model is scored as is.
    had_own_tie = "tie_weights" in vars(model)
    own_tie = vars(model).get("tie_weights")
    try:
        object.__setattr__(model, "tie_weights", lambda *args, **kwargs: None)
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            if lm.device.type == "meta":  # offloaded (device_map): accelerate's hooks move the inputs on from here
                lm._device = torch.device("cpu")
        finally:
            if had_own_tie:
                object.__setattr__(model, "tie_weights", own_tie)
            else:
                del model.__dict__["tie_weights"]
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=task_manager,
            num_fewshot=num_fewshot,
            limit=None if limit is None else int(limit),
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
            # loglikelihood tasks are deterministic: leave the caller's global RNGs alone
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
        )
    finally:
        if was_training:
            model.train()
    if out is None:  # only happens on non-zero ranks of a distributed launch
        return {}
    return _flatten({**out.get("groups", {}), **out["results"]}, names)  # a group (mmlu) scores in either
