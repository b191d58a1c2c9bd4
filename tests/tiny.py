"""Tiny random models for unit tests."""

from __future__ import annotations

import torch


def make_tiny_llama(
    vocab_size: int = 256,
    hidden: int = 64,
    intermediate: int = 160,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tie: bool = True,
    seed: int = 0,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tie,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def cli_eval_one_window(model_folder, scores_json) -> dict:
    """`compress eval` of a checkpoint on one 64-token held-out window (no lm-eval tasks), as a user runs it;
    returns the scores it wrote to ``scores_json``."""
    import json

    from compress.cli import main

    args = ["eval", str(model_folder), "--tasks", "--windows", "1", "--seq-len", "64", "--quiet"]
    assert main([*args, "--json", str(scores_json)]) == 0
    with open(scores_json) as f:
        return json.load(f)


def kill_after_layers(command: list[str], out, layers: int, **popen) -> int:
    """Start a streamed `compress run ... --out OUT` as a process, SIGKILL it (no clean-up: its unfinished run
    stays for --resume) once its resume state says ``layers`` layers are done, and return how many were."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    out = Path(out)
    state = out.parent / f".{out.name}.partial" / ".resume" / "state.pt"
    proc = subprocess.Popen([*command, "--out", str(out)], **popen)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and torch.load(state, weights_only=True)["layers_done"] >= layers:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed between layers"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return torch.load(state, weights_only=True)["layers_done"]
