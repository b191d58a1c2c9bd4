"""Integration: OFA k=128 on the real SmolLM2-135M, saved, reloaded with from_pretrained, scored."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress  # noqa: F401  registers the checkpoint format
from compress.checkpoint import mark_compressed
from compress.eval.corpora import load_documents
from compress.eval.perplexity import perplexity
from compress.eval.windows import token_windows
from compress.methods.base import StageContext
from compress.models import save_folder
from compress.modules import FactorizedEmbedding, TiedFactorizedLMHead
from compress.pipeline import compress_model
from compress.recipe import parse_recipe

pytestmark = pytest.mark.integration


def test_ofa_128_save_reload_and_perplexity(tmp_path, smollm2):
    loaded = smollm2
    model, tokenizer = loaded.model, loaded.tokenizer
    held = token_windows(tokenizer, load_documents("wikipedia", "heldout"), 512, 2)
    params_before = sum(p.numel() for p in model.parameters())

    recipe = parse_recipe({"name": "it", "stages": [{"method": "ofa_embedding", "dim": 128}]})
    (result,) = compress_model(model, recipe, StageContext(tokenizer, lambda: None, progress=False))
    V, D = 49152, 576
    assert result.summary["targeted_params_before"] == V * D
    assert sum(p.numel() for p in model.parameters()) == params_before - V * D + 128 * (V + D)
    assert isinstance(model.model.embed_tokens, FactorizedEmbedding)
    assert isinstance(model.lm_head, TiedFactorizedLMHead)

    mark_compressed(model, recipe.model_dump(mode="json"))
    save_folder(model, tokenizer, tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = held[:1, :64]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    ppl = perplexity(reloaded, held, progress=False)["perplexity"]
    assert math.isfinite(ppl) and ppl > 1
