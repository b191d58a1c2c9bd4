import pytest
import torch

from compress.errors import CompressError
from compress.methods.base import StageContext
from compress.modules import GroupedLowRankLinear, LowRankLinear
from compress.pipeline import compress_model
from compress.recipe import parse_recipe
from tests.tiny import make_tiny_llama


def _windows():
    return torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(0))


def test_per_projection_ranks_are_gqa_aware():
    model = make_tiny_llama()  # 4 q heads, 2 kv heads: k/v are 32x64
    recipe = parse_recipe(
        {
            "name": "t",
            "stages": [
                {"method": "lowrank_attention", "backend": "whiten", "per_projection": {"q": 0.5, "k": 0.25, "v": 0.25}}
            ],
        }
    )
    (result,) = compress_model(model, recipe, StageContext(None, _windows, progress=False))
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, LowRankLinear) and attn.q_proj.rank == 16  # 0.5*64*64/128
    assert isinstance(attn.k_proj, LowRankLinear) and attn.k_proj.rank == 16  # 0.75*32*64/96
    assert not isinstance(attn.o_proj, LowRankLinear)
    assert not isinstance(model.model.layers[0].mlp.up_proj, LowRankLinear)
    assert result.summary["lrc"] == 6


def test_global_budget_with_sensitivity_then_finetune_heals():
    model = make_tiny_llama()
    recipe = parse_recipe(
        {
            "name": "t",
            "stages": [
                {
                    "method": "lowrank_attention",
                    "backend": "whiten_dense_target",
                    "shrinkage": 0.1,
                    "reduction": 0.5,
                    "allocation": "sensitivity",
                    "sensitivity_windows": 2,
                },
                {
                    "method": "finetune",
                    "steps": 3,
                    "lr": 1e-3,
                    "batch_size": 2,
                    "eval_windows": 2,
                    "schedule": "constant",
                },
            ],
        }
    )
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
        parse_recipe(
            {"name": "t", "stages": [{"method": "lowrank", "targets": ["Linear"], "reduction": 0.2, "backend": "nope"}]}
        )


def _grouped_recipe(groups: int, **extra):
    return parse_recipe(
        {
            "name": "t",
            "stages": [
                {
                    "method": "lowrank_attention",
                    "backend": "whiten",
                    "per_projection": {"k": 0.25, "v": 0.25},
                    "kv_groups": groups,
                    **extra,
                }
            ],
        }
    )


def test_grouped_lowrank_module_is_blockwise_and_exact_at_full_rank():
    torch.manual_seed(0)
    W = torch.randn(32, 20)
    groups = [W[:16], W[16:]]
    full = GroupedLowRankLinear.from_factors([(torch.eye(16), w) for w in groups])  # rank 16 = rows per group
    x = torch.randn(3, 5, 20)
    torch.testing.assert_close(full(x), x @ W.T)
    torch.testing.assert_close(full.weight, W)
    assert full.latent(x).shape == (3, 5, 2, 16)
    # one group is the joint LowRankLinear
    A, B = torch.randn(32, 4), torch.randn(4, 20)
    joint = GroupedLowRankLinear.from_factors([(A, B)], bias=torch.ones(32))
    torch.testing.assert_close(joint(x), LowRankLinear.from_factors(A, B, torch.ones(32))(x))
    with pytest.raises(ValueError):
        GroupedLowRankLinear(20, 32, 3, 4)  # 3 groups do not divide 32 rows


def test_kv_groups_builds_per_group_latents_within_the_joint_budget():
    joint, grouped = make_tiny_llama(), make_tiny_llama()  # 2 kv heads: k/v are 32x64
    (r1,) = compress_model(joint, _grouped_recipe(1), StageContext(None, _windows, progress=False))
    (r2,) = compress_model(grouped, _grouped_recipe(2), StageContext(None, _windows, progress=False))
    k = grouped.model.layers[0].self_attn.k_proj
    assert isinstance(k, GroupedLowRankLinear) and k.groups == 2
    assert isinstance(grouped.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    # same budget: joint rank 16 costs 16*96 = 1536 values; per-group rank r costs r*(2*64+32)
    assert joint.model.layers[0].self_attn.k_proj.rank == 16
    assert k.rank == 1536 // 160
    assert r2.summary["targeted_params_after"] <= r1.summary["targeted_params_after"]
    ids = _windows()
    assert torch.isfinite(grouped(ids).logits).all()


def test_kv_groups_must_divide_the_kv_heads():
    with pytest.raises(CompressError, match="kv_groups=3"):
        compress_model(make_tiny_llama(), _grouped_recipe(3), StageContext(None, _windows, progress=False))


def test_grouped_checkpoint_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    from compress.checkpoint import mark_compressed

    model = make_tiny_llama()
    recipe = _grouped_recipe(2)
    compress_model(model, recipe, StageContext(None, _windows, progress=False))
    mark_compressed(model, recipe.model_dump(mode="json"))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.model.layers[1].self_attn.v_proj, GroupedLowRankLinear)
    ids = _windows()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
