import pytest
import torch

from compress.errors import CompressError
from compress.methods.base import StageContext
from compress.modules import LowRankLinear
from compress.pipeline import compress_model
from compress.recipe import parse_recipe

from tests.tiny import make_tiny_llama


def _windows():
    return torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(0))


def test_per_projection_ranks_are_gqa_aware():
    model = make_tiny_llama()  # 4 q heads, 2 kv heads: k/v are 32x64
    recipe = parse_recipe({"name": "t", "stages": [{"method": "lowrank_attention", "backend": "whiten",
                                                    "per_projection": {"q": 0.5, "k": 0.25, "v": 0.25}}]})
    (result,) = compress_model(model, recipe, StageContext(None, _windows, progress=False))
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, LowRankLinear) and attn.q_proj.rank == 16  # 0.5*64*64/128
    assert isinstance(attn.k_proj, LowRankLinear) and attn.k_proj.rank == 16  # 0.75*32*64/96
    assert not isinstance(attn.o_proj, LowRankLinear)
    assert not isinstance(model.model.layers[0].mlp.up_proj, LowRankLinear)
    assert result.summary["lrc"] == 6


def test_global_budget_with_sensitivity_then_finetune_heals():
    model = make_tiny_llama()
    recipe = parse_recipe({"name": "t", "stages": [
        {"method": "lowrank_attention", "backend": "whiten_dense_target", "shrinkage": 0.1, "reduction": 0.5,
         "allocation": "sensitivity", "sensitivity_windows": 2},
        {"method": "finetune", "steps": 3, "lr": 1e-3, "batch_size": 2, "eval_windows": 2, "schedule": "constant"},
    ]})
    lowrank, finetune = compress_model(model, recipe, StageContext(None, _windows, progress=False))
    assert 0.5 <= lowrank.summary["achieved_reduction"] <= 0.505
    assert finetune.summary["trainable_params"] > 0
    assert finetune.summary["calibration_loss_after"] < finetune.summary["calibration_loss_before"]


def test_bad_configs_rejected():
    with pytest.raises(CompressError):
        parse_recipe({"name": "t", "stages": [{"method": "lowrank_attention"}]})
    with pytest.raises(CompressError):
        parse_recipe({"name": "t", "stages": [{"method": "lowrank_attention", "per_projection": {"q": 1.5}}]})
    with pytest.raises(CompressError):
        parse_recipe({"name": "t", "stages": [{"method": "lowrank", "targets": ["Linear"], "reduction": 0.2,
                                               "backend": "nope"}]})
