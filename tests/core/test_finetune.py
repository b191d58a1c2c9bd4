import torch

from compress.methods.base import StageContext
from compress.modules import LowRankLinear
from compress.pipeline import apply_stage
from compress.recipe import parse_recipe


def _learnable_windows(n=16, length=32, vocab=256):
    """Windows of a fixed periodic pattern with random offsets: easy to fit, so loss must fall."""
    pattern = torch.randint(3, vocab, (17,), generator=torch.Generator().manual_seed(1))
    starts = torch.randint(0, 17, (n,), generator=torch.Generator().manual_seed(2))
    return torch.stack([pattern[(torch.arange(length) + s) % 17] for s in starts])


def test_finetune_trains_only_lrc_factors_and_lowers_loss(tiny_llama):
    recipe = parse_recipe(
        {
            "name": "t",
            "stages": [
                {
                    "method": "welore",
                    "targets": [r"re:.*\.(q|k|v|o|gate|up|down)_proj$"],
                    "reduction": 0.3,
                    "ignore": [r"re:.*\.0\.mlp\.down_proj"],
                },
                {
                    "method": "finetune",
                    "steps": 25,
                    "lr": 3e-3,
                    "batch_size": 4,
                    "eval_windows": 8,
                    "schedule": "linear",
                },
            ],
        }
    )
    windows = _learnable_windows()
    ctx = StageContext(tokenizer=None, calibration_windows=lambda: windows, progress=False)
    apply_stage(tiny_llama, recipe.stages[0], ctx)
    frozen_before = {
        n: p.detach().clone()
        for n, p in tiny_llama.named_parameters()
        if not isinstance(tiny_llama.get_submodule(n.rsplit(".", 1)[0]), LowRankLinear)
    }
    lowrank_before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters() if n not in frozen_before}

    result = apply_stage(tiny_llama, recipe.stages[1], ctx)

    summary = result.summary
    assert summary["calibration_loss_after"] < summary["calibration_loss_before"] - 0.5, summary
    assert summary["steps"] == 25 and summary["tokens"] == 25 * 4 * 32
    assert len(result.series["train_loss"]) == 25
    assert summary["trainable_params"] == sum(p.numel() for p in lowrank_before.values())
    params = dict(tiny_llama.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen_before.items())  # N-LRC, norms, embeddings
    assert any(not torch.equal(params[n], p) for n, p in lowrank_before.items())
    assert not any(p.requires_grad for p in tiny_llama.parameters())  # left ready for inference


def _mean_kl(student, teacher, windows):
    from compress.training import distillation_loss

    with torch.no_grad():
        return float(distillation_loss(student(input_ids=windows).logits, teacher(input_ids=windows).logits))


def test_distill_pulls_the_compressed_model_towards_the_dense_one(tiny_llama):
    import copy

    from compress.pipeline import compress_model

    dense = copy.deepcopy(tiny_llama)
    windows = torch.randint(3, 256, (16, 32), generator=torch.Generator().manual_seed(0))
    compress = parse_recipe(
        {"name": "t", "stages": [{"method": "lowrank", "targets": [r"re:.*\.(gate|up|down)_proj$"], "reduction": 0.6}]}
    )
    heal = parse_recipe(
        {
            "name": "t",
            "stages": [
                *compress.model_dump()["stages"],
                {"method": "finetune", "loss": "distill", "steps": 30, "lr": 3e-3, "batch_size": 4, "eval_windows": 4},
            ],
        }
    )
    ctx = StageContext(tokenizer=None, calibration_windows=lambda: windows, progress=False)
    unhealed = copy.deepcopy(tiny_llama)
    compress_model(unhealed, compress, ctx)

    results = compress_model(tiny_llama, heal, ctx)

    assert results[1].summary["loss"] == "distill"
    # the teacher was the model before the first stage, and it is dropped after the run
    assert ctx.teacher is None
    before, after = _mean_kl(unhealed, dense, windows), _mean_kl(tiny_llama, dense, windows)
    assert after < 0.5 * before, (before, after)


def test_distillation_loss_is_zero_only_for_equal_distributions():
    from compress.training import distillation_loss

    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    assert float(distillation_loss(logits, logits + 3.0)) < 1e-6  # a shift leaves softmax unchanged
    assert float(distillation_loss(logits, 2 * logits)) > 1e-3


def test_distill_without_a_teacher_is_a_clear_error(tiny_llama):
    import pytest

    from compress.errors import CompressError

    recipe = parse_recipe(
        {"name": "t", "stages": [{"method": "finetune", "targets": ["re:.*up_proj$"], "loss": "distill", "steps": 2}]}
    )
    ctx = StageContext(tokenizer=None, calibration_windows=lambda: torch.zeros(2, 8, dtype=torch.long), progress=False)
    with pytest.raises(CompressError, match="teacher"):
        apply_stage(tiny_llama, recipe.stages[0], ctx)
