"""Score a model: token-level held-out perplexity + lm-eval tasks (``compress.evaluate`` wraps it); a checkpoint
larger than memory is scored streamed, layer by layer."""

from __future__ import annotations

import time
from pathlib import Path


def check_eval(eval_config) -> None:
    """Before any heavy work: the lm-eval extra is there and every task exists and can load its data."""
    if eval_config.tasks:
        from .eval.lm_eval_runner import check_tasks
        from .utils import require

        require("lm_eval", "eval", "evaluating lm-eval tasks")
        check_tasks(eval_config.tasks)


def evaluate(model, tokenizer, eval_config, progress: bool = True) -> dict:
    """Held-out perplexity on every corpus of ``eval_config``, its lm-eval tasks and (elastic) budgets.

    ``model`` is a loaded model, or the path of a checkpoint folder (a model larger than memory): its token
    perplexity is then streamed layer by layer, and its lm-eval tasks and budgets run on the checkpoint placed
    by accelerate (:func:`compress.models.load_offloaded`: what does not fit in ``max_memory_gib`` is read
    from the shards as it runs). Each perplexity records the ``path`` that computed it, and ``placement``
    where an offloaded model's modules were."""
    from .distributed import is_main
    from .eval.corpora import load_documents
    from .eval.lm_eval_runner import run_lm_eval
    from .eval.perplexity import perplexity
    from .eval.windows import token_windows

    streamed = isinstance(model, (str, Path))
    start = time.perf_counter()
    by_corpus = {}
    for corpus in eval_config.perplexity_corpora:
        windows = token_windows(
            tokenizer, load_documents(corpus, "heldout"), eval_config.seq_len, eval_config.perplexity_windows
        )
        if streamed:
            from .eval.streamed import streamed_perplexity

            scores = streamed_perplexity(model, windows, progress=progress)
        else:
            scores = {**perplexity(model, windows, progress=progress), "path": "in memory"}
        by_corpus[corpus] = {**scores, "seq_len": eval_config.seq_len, "corpus": corpus}
    result = {"perplexity": by_corpus[eval_config.perplexity_corpora[0]]}
    if len(by_corpus) > 1:
        result["perplexity_by_corpus"] = by_corpus
    if streamed and (eval_config.budgets or (eval_config.tasks and is_main())):
        from .models import load_offloaded

        model, result["placement"] = load_offloaded(model, eval_config.max_memory_gib)
    if eval_config.tasks and is_main():  # several processes: lm-eval runs in the main one only
        result["lm_eval"] = {}
        for task in eval_config.tasks:  # one call per task: each has its own document limit and shots
            result["lm_eval"].update(
                run_lm_eval(
                    model,
                    tokenizer,
                    [task],
                    limit=eval_config.limit_for(task),
                    max_length=eval_config.lm_eval_max_length,
                    num_fewshot=eval_config.num_fewshot_for(task),
                )
            )
    if eval_config.budgets:
        result["budgets"] = budget_perplexities(model, tokenizer, eval_config, progress)
    result["wall_time_s"] = time.perf_counter() - start
    return result


def budget_perplexities(model, tokenizer, eval_config, progress: bool) -> list[dict]:
    """An elastic model's held-out perplexity at each budget (views of the same factors); its own budget is
    restored afterwards."""
    from .elastic import elastic_modules, reduction_at, select, selections, set_budget
    from .eval.corpora import load_documents
    from .eval.perplexity import perplexity
    from .eval.windows import token_windows

    modules = elastic_modules(model)
    before = selections(model)
    windows = token_windows(
        tokenizer,
        load_documents(eval_config.perplexity_corpora[0], "heldout"),
        eval_config.seq_len,
        eval_config.perplexity_windows,
    )
    out = []
    try:
        for budget in eval_config.budgets:
            ranks = set_budget(model, budget)
            out.append(
                {
                    "requested_reduction": budget,
                    "reduction": reduction_at(modules, ranks),
                    "perplexity": perplexity(model, windows, progress=progress)["perplexity"],
                }
            )
    finally:
        select(model, before)
    return out
