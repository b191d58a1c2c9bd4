"""Calibration data: bundled corpora, local files and datasets through `datasets`, chat rendering, weighted
mixes, and a missing dataset failing in one line before any model loads."""

import json

import pytest
import torch
import yaml

from compress.calibration import build_calibration, interleave, window_counts
from compress.cli import main
from compress.errors import CompressError
from compress.eval.corpora import load_documents
from compress.eval.windows import token_windows
from compress.recipe import CalibrationConfig, parse_recipe


def test_window_counts_follow_the_weights_and_give_every_source_a_window():
    assert window_counts([0.5, 0.5], 5) == [3, 2]
    assert window_counts([3, 1], 8) == [6, 2]
    assert window_counts([100, 0.01], 4) == [3, 1]
    assert sum(window_counts([0.2, 0.3, 0.5], 7)) == 7


def test_interleaving_keeps_the_mix_in_every_prefix():
    a, b = torch.zeros(4, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long)
    merged = interleave([a, b])
    assert merged[:, 0].tolist() == [0, 1, 0, 0, 1, 0]


def test_one_corpus_gives_the_same_windows_as_before(smol_tokenizer):
    config = CalibrationConfig(corpus="wikipedia", samples=6, seq_len=64)
    built = build_calibration(smol_tokenizer, config)
    expected = token_windows(smol_tokenizer, load_documents("wikipedia", "calibration"), 64, 6)
    assert torch.equal(built.windows, expected)
    assert built.sources == [{"source": "wikipedia (bundled, calibration split)", "weight": 1.0, "windows": 6}]


def test_the_default_is_a_mix_of_two_domains(smol_tokenizer):
    built = build_calibration(smol_tokenizer, CalibrationConfig(samples=4, seq_len=64))
    assert [(s["source"].split()[0], s["windows"]) for s in built.sources] == [("wikipedia", 2), ("shakespeare", 2)]
    shakespeare = token_windows(smol_tokenizer, load_documents("shakespeare", "calibration"), 64, 2)
    assert torch.equal(built.windows[1], shakespeare[0])  # interleaved: wiki, shakespeare, wiki, shakespeare


def test_local_files_of_every_kind_and_chat_messages(tmp_path, smol_tokenizer):
    import datasets

    text = "The quick brown fox jumps over the lazy dog. " * 80
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": text[i:] + " end"}) + "\n" for i in range(5)))
    datasets.Dataset.from_list([{"text": text}] * 3).to_parquet(str(tmp_path / "c.parquet"))
    chat = [
        {
            "messages": [
                {"role": "user", "content": "Tell me about foxes. " * 20},
                {"role": "assistant", "content": text},
            ]
        }
    ] * 3
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chat))
    config = CalibrationConfig(
        samples=8,
        seq_len=64,
        sources=[
            {"file": str(tmp_path / "a.txt")},
            {"file": str(tmp_path / "b.jsonl"), "text_field": "body"},
            {"file": str(tmp_path / "c.parquet"), "weight": 2},
            {"file": str(tmp_path / "d.jsonl"), "messages_field": "messages"},
        ],
    )
    built = build_calibration(smol_tokenizer, config)
    assert built.windows.shape == (8, 64)
    assert [s["windows"] for s in built.sources] == [2, 2, 3, 1]  # weights 1, 1, 2, 1 of 8 windows
    assert built.sources[3]["source"].endswith("field messages (chat template)")
    rendered = smol_tokenizer.decode(built.windows.reshape(-1))
    assert "<|im_start|>user" in rendered  # the chat template was applied


def test_max_documents_reads_only_the_first_documents_of_every_kind_of_source(tmp_path, monkeypatch):
    from compress.calibration import source_documents
    from compress.recipe import CalibrationSource

    monkeypatch.setenv("HOME", str(tmp_path))  # a `~/` path is expanded for the datasets library too
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(9)))
    from_file = source_documents(CalibrationSource(file="~/notes.jsonl", max_documents=3))
    assert from_file == ["document 0", "document 1", "document 2"]
    bundled = source_documents(CalibrationSource(corpus="wikipedia", max_documents=2))
    assert bundled == load_documents("wikipedia", "calibration")[:2]


@pytest.mark.parametrize(
    "source, message",
    [
        ({"corpus": "wikipedia", "file": "x.txt"}, "exactly one of corpus, dataset or file"),
        ({"file": "/no/such/file.jsonl"}, "does not exist"),
        ({"corpus": "klingon"}, "corpus"),
    ],
)
def test_bad_sources_are_rejected_with_their_path(source, message):
    with pytest.raises(CompressError, match=message) as err:
        parse_recipe(
            {"name": "t", "stages": [{"method": "welore", "reduction": 0.3}], "calibration": {"sources": [source]}}
        )
    assert "calibration.sources[0]" in str(err.value)


def test_a_missing_dataset_fails_in_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "stages": [{"method": "lowrank", "reduction": 0.3, "backend": "whiten"}],
                "calibration": {"sources": [{"dataset": "nobody/no-such-dataset"}], "samples": 4, "seq_len": 32},
                "eval": {"tasks": [], "perplexity_windows": 1},
            }
        )
    )
    out = tmp_path / "run"
    assert main(["run", str(recipe), "smollm2-135m", "--out", str(out), "--quiet"]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "calibration data 'nobody/no-such-dataset' cannot be loaded" in errors[0]
    assert "loading" not in captured.out and not out.exists()
