"""CPU latency of dense vs compressed models, measured in one process and interleaved.

Interleaving (dense, compressed, dense, compressed, ...) and taking medians keeps slow drifts of a
shared machine (thermal, another process) from biasing the ratio one way.
"""

from __future__ import annotations

import statistics
import time

import torch


def _forward_seconds(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids)
    return time.perf_counter() - start


def _decode_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return time.perf_counter() - start


def compare_latency(
    models: dict, ids: torch.Tensor, new_tokens: int = 64, prompt_tokens: int = 16, repeats: int = 5
) -> dict:
    """Median seconds of one forward over ``ids`` [1, T] and of ``new_tokens`` greedy decoding steps.

    Returns ``{name: {"forward_s", "decode_s"}, "repeats": n}``; one warm-up run of each is discarded.
    """
    timings = {name: {"forward": [], "decode": []} for name in models}
    prompt = ids[:, :prompt_tokens]
    with torch.inference_mode():
        for model in models.values():
            model.eval()
            _forward_seconds(model, ids)
            _decode_seconds(model, prompt, 4)
        for _ in range(repeats):
            for name, model in models.items():
                timings[name]["forward"].append(_forward_seconds(model, ids))
                timings[name]["decode"].append(_decode_seconds(model, prompt, new_tokens))
    out = {
        name: {"forward_s": statistics.median(t["forward"]), "decode_s": statistics.median(t["decode"])}
        for name, t in timings.items()
    }
    out["repeats"] = repeats
    return out
