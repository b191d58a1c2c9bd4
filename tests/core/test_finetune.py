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
    recipe = parse_recipe({"name": "t", "stages": [
        {"method": "welore", "targets": [r"re:.*\.(q|k|v|o|gate|up|down)_proj$"], "reduction": 0.3,
         "ignore": [r"re:.*\.0\.mlp\.down_proj"]},
        {"method": "finetune", "steps": 25, "lr": 3e-3, "batch_size": 4, "eval_windows": 8, "schedule": "linear"},
    ]})
    windows = _learnable_windows()
    ctx = StageContext(tokenizer=None, calibration_windows=lambda: windows, progress=False)
    apply_stage(tiny_llama, recipe.stages[0], ctx)
    frozen_before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()
                     if not isinstance(tiny_llama.get_submodule(n.rsplit(".", 1)[0]), LowRankLinear)}
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
