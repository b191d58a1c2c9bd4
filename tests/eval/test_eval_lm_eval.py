"""compress.eval.lm_eval_runner: offline lm-eval tasks on an in-memory model.

The lm-eval numbers are compared with log-likelihoods computed here by hand with the same
tiny model, so a wrong prompt, tokenisation, window or normalisation shows up as a mismatch.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from compress.eval.corpora import load_records
from compress.eval.lm_eval_runner import (
    available_tasks,
    build_task_data,
    prepare_tasks,
    run_lm_eval,
)

BPE_MAX_LENGTH = 512  # whole articles -> many rolling windows
SMOL_MAX_LENGTH = 128
LIMIT = 2


def _encode(tok, text):
    return tok(text, add_special_tokens=False, verbose=False)["input_ids"]


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1).double()


def _rolling_loglikelihood(model, tokens, prefix, max_len):
    """log p(tokens | prefix), each token scored with the last <= max_len tokens before it,
    windows of max_len predicted tokens laid end to end (lm-eval's context_len=1 rolling)."""
    ids = [prefix] + tokens  # ids[j + 1] == tokens[j]
    total = 0.0
    for start in range(0, len(tokens), max_len):
        end = min(start + max_len, len(tokens))
        lo = max(0, end - max_len)
        logp = _logprobs(model, ids[lo:end])  # row r predicts ids[lo + r + 1]
        rows = torch.arange(start - lo, end - lo)
        total += logp[rows, torch.tensor(ids[start + 1 : end + 1])].sum().item()
    return total


def _lastword_expected(model, tok, docs, max_len):
    lls, greedy = [], []
    for doc in docs:
        ctx, cont = _encode(tok, doc["context"]), _encode(tok, doc["target"])
        assert ctx + cont == _encode(tok, doc["context"] + doc["target"])
        whole = (ctx + cont)[-(max_len + 1) :]
        logp = _logprobs(model, whole[:-1])[-len(cont) :]
        lls.append(sum(logp[i, t].item() for i, t in enumerate(cont)))
        greedy.append(logp.argmax(-1).tolist() == cont)
    return {"perplexity": math.exp(-sum(lls) / len(lls)), "acc": sum(greedy) / len(greedy)}


@pytest.fixture(scope="module")
def bpe_run(eval_bpe_llama, eval_bpe_tokenizer):
    """Every task, first LIMIT documents, on the tiny BPE-vocabulary model."""
    return run_lm_eval(eval_bpe_llama, eval_bpe_tokenizer, available_tasks(), limit=LIMIT, max_length=BPE_MAX_LENGTH)


def test_task_names_and_errors():
    assert available_tasks() == ["wikipedia_ppl", "shakespeare_ppl", "wikipedia_lastword"]
    from compress.errors import CompressError
    from compress.eval.lm_eval_runner import check_tasks

    with pytest.raises(CompressError, match=r"unknown eval task 'wikipedia_pp' \(did you mean 'wikipedia_ppl'\?\)"):
        check_tasks(["wikipedia_pp"])  # neither ours nor lm-eval's
    with pytest.raises(ValueError, match="limit"):
        run_lm_eval(None, None, ["wikipedia_ppl"], limit=0)


def test_task_data():
    wiki = build_task_data("wikipedia_ppl")
    assert [d["text"] for d in wiki] == [r["text"] for r in load_records("wikipedia", "heldout")]

    chunks = build_task_data("shakespeare_ppl")
    plays = {r["title"]: r["text"] for r in load_records("shakespeare", "heldout")}
    assert len(chunks) == 30 and {c["title"] for c in chunks} == set(plays)
    assert [c["title"] for c in chunks[:10]] == list(plays)  # interleaved: one chunk per play first
    for c in chunks:
        assert 2000 <= len(c["text"].split()) < 2300
        assert c["text"] in plays[c["title"]]

    lastword = build_task_data("wikipedia_lastword")
    assert 100 <= len(lastword) <= 300
    assert len({d["title"] for d in lastword[:10]}) == 10  # interleaved across articles
    for d in lastword:
        words = d["text"].split(" ")
        assert "\n" not in d["text"] and "  " not in d["text"]
        assert d["context"] == " ".join(words[:-1]) and d["target"] == " " + words[-1]
        assert re.fullmatch(r"[A-Za-z]{3,}", words[-1])
        # ~6-8 sentences (counted loosely here: "e.g. " and "[...] " fool a simple count)
        assert 3 <= len(re.findall(r"[.!?](?= )", d["text"])) <= 30
        assert 40 <= len(words) <= 800
    heldout = {r["title"]: " ".join(r["text"].split()) for r in load_records("wikipedia", "heldout")}
    for d in lastword:  # passages are verbatim held-out text
        assert d["text"] in heldout[d["title"]]
    assert build_task_data("wikipedia_lastword") == lastword  # deterministic


def test_rendered_yaml_points_at_the_generated_data():
    task_dir = prepare_tasks(available_tasks())
    for name in available_tasks():
        cfg = yaml.safe_load((task_dir / f"{name}.yaml").read_text())
        assert cfg["task"] == name and cfg["dataset_path"] == "json"
        data = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert data.is_absolute() and data.exists()
        assert [json.loads(line) for line in data.read_text().splitlines()] == build_task_data(name)
    template = (Path(__file__).parents[2] / "eval" / "tasks" / "wikipedia_ppl.yaml").read_text()
    assert "__DATA_FILE__" in template


@pytest.mark.parametrize("task", ["wikipedia_ppl", "shakespeare_ppl"])
def test_perplexity_tasks_match_hand_computation(bpe_run, eval_bpe_llama, eval_bpe_tokenizer, task):
    got = bpe_run[task]
    assert set(got) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    for value in got.values():
        assert math.isfinite(value) and value > 0
    docs = build_task_data(task)[:LIMIT]
    words = sum(len(re.split(r"\s+", d["text"])) for d in docs)
    n_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
    # lm-eval conditions each document's first token on the BOS token
    tokens = [_encode(eval_bpe_tokenizer, d["text"]) for d in docs]
    assert all(len(t) > 2 * BPE_MAX_LENGTH for t in tokens)  # several rolling windows each
    ll = sum(_rolling_loglikelihood(eval_bpe_llama, t, eval_bpe_tokenizer.bos_token_id, BPE_MAX_LENGTH) for t in tokens)
    assert got["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-4)
    assert got["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-4)


def test_lastword_matches_hand_computation(bpe_run, eval_bpe_llama, eval_bpe_tokenizer):
    got = bpe_run["wikipedia_lastword"]
    assert set(got) == {"perplexity", "acc"}
    expected = _lastword_expected(
        eval_bpe_llama, eval_bpe_tokenizer, build_task_data("wikipedia_lastword")[:LIMIT], BPE_MAX_LENGTH
    )
    assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
    assert got["acc"] == expected["acc"]


def test_lastword_with_the_smollm2_tokenizer(eval_tiny_llama, eval_tokenizer):
    """The real tokenizer path (BOS <|im_start|>, GGUF-built tokenizer) on a cheap task."""
    got = run_lm_eval(eval_tiny_llama, eval_tokenizer, ["wikipedia_lastword"], limit=LIMIT, max_length=SMOL_MAX_LENGTH)
    expected = _lastword_expected(
        eval_tiny_llama, eval_tokenizer, build_task_data("wikipedia_lastword")[:LIMIT], SMOL_MAX_LENGTH
    )
    assert got["wikipedia_lastword"]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
    assert got["wikipedia_lastword"]["acc"] == expected["acc"]
    assert math.isfinite(got["wikipedia_lastword"]["perplexity"])


def test_model_and_tokenizer_are_scored_as_given(bpe_run, eval_bpe_tokenizer):
    """HFLM would re-tie untied embeddings (model.tie_weights) and set a pad token on the
    tokenizer; run_lm_eval must leave both objects as they were."""
    from transformers import LlamaConfig, LlamaForCausalLM

    assert eval_bpe_tokenizer.pad_token is None  # bpe_run did not give it one
    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=len(eval_bpe_tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))  # untied
    head = model.lm_head.weight.detach().clone()
    got = run_lm_eval(model, eval_bpe_tokenizer, ["wikipedia_lastword"], limit=1, max_length=BPE_MAX_LENGTH)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, head)
    assert "tie_weights" not in vars(model)
    expected = _lastword_expected(model, eval_bpe_tokenizer, build_task_data("wikipedia_lastword")[:1], BPE_MAX_LENGTH)
    assert got["wikipedia_lastword"]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
