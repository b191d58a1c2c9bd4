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
