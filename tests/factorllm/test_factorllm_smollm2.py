"""Integration: FactorLLM 4e2k (cluster partition, fitted routers) on the real SmolLM2-135M, saved and reloaded."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress  # noqa: F401  registers the checkpoint format
from compress.calibration import calibration_windows
from compress.checkpoint import mark_compressed
from compress.eval.corpora import load_documents
from compress.eval.perplexity import perplexity
from compress.eval.windows import token_windows
from compress.methods.base import StageContext
from compress.methods.factorllm import measure_agreement
from compress.models import save_folder
from compress.modules import MoEFeedForward
from compress.pipeline import apply_stage
from compress.recipe import parse_recipe

pytestmark = pytest.mark.integration


def test_split_fit_save_reload_and_perplexity(tmp_path, smollm2):
    loaded = smollm2
    model, tokenizer = loaded.model, loaded.tokenizer
    held = token_windows(tokenizer, load_documents("wikipedia", "heldout"), 512, 1)
    recipe = parse_recipe(
        {
            "name": "it",
            "stages": [
                {
                    "method": "factorllm",
                    "targets": [r"re:.*layers\.(0|1)\.mlp$"],
                    "experts": 4,
                    "top_k": 2,
                    "partition": "cluster",
                    "router_fit_windows": 8,
                    "router_fit_epochs": 3,
                }
            ],
            "calibration": {"samples": 8, "seq_len": 256},
        }
    )
    calib = calibration_windows(tokenizer, recipe.calibration)
    result = apply_stage(model, recipe.stages[0], StageContext(tokenizer, lambda: calib, progress=False))
    assert result.summary["ffns"] == 2 and result.summary["ffn_flops_ratio"] == pytest.approx(0.5, abs=0.01)
    assert result.summary["router_fit_agreement"] > 0.7  # chance is 0.5
    held_out = measure_agreement(model, held[:, :256])
    assert held_out["agreement"] > held_out["chance"] + 0.1  # the fitted routers generalise to unseen text

    mark_compressed(model, recipe.model_dump(mode="json"))
    save_folder(model, tokenizer, tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert isinstance(reloaded.model.layers[1].mlp, MoEFeedForward)
    assert not isinstance(reloaded.model.layers[2].mlp, MoEFeedForward)
    ids = held[:, :64]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    ppl = perplexity(reloaded, held, progress=False)["perplexity"]
    assert math.isfinite(ppl) and 5 < ppl < 200
