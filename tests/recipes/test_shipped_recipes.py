"""Every file in recipes/ runs through `compress run` the way a user runs it.

The recipe's own stages and options stay as shipped; only the model is swapped for a tiny random one
and the calibration and evaluation sizes are shrunk. Each run must get through the whole job: the
checkpoint, both evaluations, report.json / report.md / plots, the model card (`compress push
--dry-run`), and a reload with ``from_pretrained`` whose perplexity (`compress eval`) equals the one the
report recorded. The recipes are enumerated from the folder, so a recipe added later is covered too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from compress.cli import main
from compress.models import save_folder
from tests.tiny import make_tiny_llama

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
EVAL_WINDOWS, EVAL_SEQ_LEN = 2, 64


def shrunk(recipe: Path, folder: Path) -> Path:
    """The recipe with small calibration and evaluation sizes (stages untouched)."""
    data = yaml.safe_load(recipe.read_text())
    data["calibration"] = {**data.get("calibration", {}), "samples": 8, "seq_len": 32}
    ev = data.get("eval", {})
    tasks = ev.get("tasks", ["wikipedia_ppl"])
    data["eval"] = {
        **ev,
        "perplexity_windows": EVAL_WINDOWS,
        "seq_len": EVAL_SEQ_LEN,
        "lm_eval_max_length": 128,
        "limit": {task: 1 for task in tasks} or None,
    }
    path = folder / recipe.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_gemma3(vocab_size: int, hidden: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    return Gemma3ForCausalLM(
        Gemma3TextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
    ).eval()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smol_tokenizer) -> dict[str, Path]:
    """A tiny Llama and a tiny Gemma-3 with the real SmolLM2 tokenizer. The vocabulary is 512 rows larger
    than the tokenizer's, so a recipe that keeps the 49,152 most frequent rows dense still has a tail to
    factorise; the width (192) is above the OFA recipes' k = 128; the FFN (256) splits into 8 experts."""
    root = tmp_path_factory.mktemp("recipe-models")
    vocab = len(smol_tokenizer) + 512
    models = {
        "llama": make_tiny_llama(vocab_size=vocab, hidden=192, intermediate=256, heads=6, kv_heads=3),
        "gemma3": tiny_gemma3(vocab, 192),
    }
    folders = {}
    for kind, model in models.items():
        folders[kind] = root / kind
        save_folder(model, smol_tokenizer, folders[kind])
    return folders


@pytest.mark.integration  # every recipe end to end through the CLI: minutes, not seconds
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_runs_end_to_end(recipe, tiny_models, tmp_path, capsys):
    model = tiny_models["gemma3" if "gemma" in recipe.stem else "llama"]
    out = tmp_path / "run"
    assert main(["run", str(shrunk(recipe, tmp_path)), str(model), "--out", str(out), "--quiet"]) == 0, (
        capsys.readouterr().err
    )

    report = json.loads((out / "report.json").read_text())
    assert "error" not in report
    assert [s["method"] for s in report["stages"]] == [
        s["method"] for s in yaml.safe_load(recipe.read_text())["stages"]
    ]
    for name in ["report.md", "recipe.yaml", "model/config.json", *report["figures"]]:
        assert (out / name).is_file(), name
    markdown = (out / "report.md").read_text()
    assert "| parameters (whole model) |" in markdown and "None" not in markdown.split("## Stage")[0]
    if any("rank" in row for stage in report["stages"] for row in stage["rows"]):
        assert any(f.startswith("ranks_stage") for f in report["figures"])

    # the model card renders (and passes huggingface_hub's own checks) without any network
    assert main(["push", str(out), "you/tiny-" + recipe.stem, "--dry-run"]) == 0
    card = capsys.readouterr().out
    assert "base_model_relation" not in card or "finetune" in card
    assert f"`{report['recipe']['name']}`" in card

    # reload through from_pretrained (`compress eval`) and score it: the report's number comes back
    scores = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                str(out / "model"),
                "--tasks",
                "--windows",
                str(EVAL_WINDOWS),
                "--seq-len",
                str(EVAL_SEQ_LEN),
                "--quiet",
                "--json",
                str(scores),
            ]
        )
        == 0
    )
    reloaded = json.loads(scores.read_text())["perplexity"]["perplexity"]
    assert reloaded == pytest.approx(report["eval_compressed"]["perplexity"]["perplexity"], rel=1e-4)
