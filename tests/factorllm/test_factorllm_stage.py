"""The factorllm stage through the pipeline: checkpoint round trip, shipped recipes, bad input."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import compress  # noqa: F401  registers the checkpoint format
from compress.checkpoint import mark_compressed
from compress.errors import CompressError
from compress.methods.base import StageContext
from compress.methods.factorllm import model_ffn_flops
from compress.models import load_folder, save_folder
from compress.modules import MoEFeedForward
from compress.pipeline import apply_stage, compress_model
from compress.recipe import parse_recipe
from tests.tiny import make_tiny_llama

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def windows(n=8, seq=32, seed=0, vocab=256):
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def run(model, stage: dict, calib):
    recipe = parse_recipe({"name": "t", "stages": [{"method": "factorllm", **stage}]})
    return recipe, apply_stage(model, recipe.stages[0], StageContext(None, lambda: calib, progress=False))


def test_round_trip_after_training_gives_identical_logits(tmp_path, smol_tokenizer):
    vocab = len(smol_tokenizer)
    model = make_tiny_llama(vocab_size=vocab)
    calib = windows(vocab=vocab)
    recipe, result = run(
        model,
        {
            "experts": 3,
            "top_k": 1,
            "shared_experts": 1,
            "combine": "weights",
            "trainable": "router+experts",
            "train": {"steps": 2, "batch_size": 4},
        },
        calib,
    )
    assert result.summary["ffn_flops_ratio"] < 0.6
    mark_compressed(model, recipe.model_dump(mode="json"))
    save_folder(model, smol_tokenizer, tmp_path / "model")
    spec = json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]["modules"]
    assert spec["model.layers.1.mlp"] == {
        "type": "moe_ffn",
        "hidden_size": 64,
        "expert_size": 40,
        "experts": 3,
        "top_k": 1,
        "shared": 1,
        "combine": "weights",
        "activation": "silu",
    }
    ids = windows(2, 17, seed=5, vocab=vocab)
    with torch.no_grad():
        expected = model(ids).logits
    ours, _, _ = load_folder(tmp_path / "model")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    for reloaded in (ours, plain):
        mlp = reloaded.model.layers[1].mlp
        assert isinstance(mlp, MoEFeedForward)
        assert torch.equal(mlp.neurons, model.model.layers[1].mlp.neurons)
        assert torch.equal(mlp.router.weight, model.model.layers[1].mlp.router.weight)
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, expected)


@pytest.mark.parametrize("name", ["factorllm-4e2k", "factorllm-8e2k", "factorllm-1s3e1k"])
def test_shipped_recipe_runs_on_a_tiny_model(name):
    data = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    stage = data["stages"][0]
    stage.update(router_fit_windows=4, cluster_tokens=256)  # tiny budget, same settings
    stage["train"].update(steps=2, warmup_steps=0)
    recipe = parse_recipe(data)
    model = make_tiny_llama()
    results = compress_model(model, recipe, StageContext(None, lambda: windows(4, 32), progress=False))
    summary = results[0].summary
    experts = stage["experts"]
    assert summary["experts"] == experts and summary["partition"] == "cluster"
    assert summary["ffn_flops_ratio"] == pytest.approx(model_ffn_flops(model)["ffn_flops_ratio"])
    assert summary["ffn_flops_ratio"] < 2 / experts + 0.05
    assert len(results[0].series["train_loss"]) == 2
    with torch.no_grad():
        assert torch.isfinite(model(windows(2, 16)).logits).all()


@pytest.mark.parametrize(
    "stage,message",
    [
        ({"experts": 4, "top_k": 5}, "top_k (5) must not exceed experts (4)"),
        ({"partition": "kmeans"}, "stages[0].partition"),
        ({"combine": "mean"}, "stages[0].combine"),
        ({"train": "router"}, "say what trains with trainable: router"),
        ({"train": {"steps": 2, "scope": "layer"}}, "train.scope must be global"),
    ],
)
def test_bad_config_is_rejected_in_one_line(stage, message):
    with pytest.raises(CompressError) as err:
        parse_recipe({"name": "t", "stages": [{"method": "factorllm", **stage}]})
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "stage,message",
    [
        ({"experts": 6}, "intermediate size 160 is not divisible into experts + shared_experts = 6"),
        ({"experts": 4, "shared_experts": 1, "router_fit": "none", "partition": "random"}, None),
        ({"targets": [r"re:.*\.q_proj$"]}, "not a gated FFN"),
    ],
)
def test_shapes_and_targets_are_checked_before_any_work(stage, message):
    model = make_tiny_llama()
    if message is None:  # 160 = 5 * 32 splits fine
        run(model, stage, windows())
        return
    with pytest.raises(CompressError, match=re.escape(message)):
        run(model, stage, windows())
    assert not any(isinstance(m, MoEFeedForward) for m in model.modules())
