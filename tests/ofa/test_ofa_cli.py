"""`compress run` with an ofa_embedding stage: checkpoint, report and `compress eval` of the result."""

import json

import yaml

from compress.cli import main
from compress.models import save_folder
from tests.tiny import cli_eval_one_window, make_tiny_llama


def test_run_factorises_saves_and_reloads(tmp_path, smol_tokenizer):
    folder = tmp_path / "tiny-model"
    save_folder(make_tiny_llama(vocab_size=len(smol_tokenizer), hidden=64, layers=1), smol_tokenizer, folder)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "tiny-ofa",
                "stages": [{"method": "ofa_embedding", "reduction": 0.5, "weighting": "frequency"}],
                "calibration": {"samples": 4, "seq_len": 64},
                "eval": {"tasks": [], "perplexity_windows": 1, "seq_len": 64},
            }
        )
    )
    out = tmp_path / "run"
    assert main(["run", str(recipe), str(folder), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    size = report["size"]
    assert size["compression_ratio"] >= 0.5
    assert (
        size["params_before"] - size["params_after"] == size["targeted_params_before"] - size["targeted_params_after"]
    )
    assert size["bytes_after"] < size["bytes_before"]
    assert report["stages"][0]["summary"]["head"] == "tied to the factors"
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # the tie lives in our modules now
    assert {spec["type"] for spec in config["quantization_config"]["modules"].values()} == {
        "factorized_embedding",
        "tied_factorized_lm_head",
    }
    scores = cli_eval_one_window(out / "model", tmp_path / "e.json")
    assert scores["perplexity"]["perplexity"] > 1
