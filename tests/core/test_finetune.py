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


def _one_step(model, windows, separate: bool):
    """One train_loop step over three forward passes (summed into one loss, or as SeparateLosses): the step's
    gradient of every trained parameter, and the most saved activations alive at once."""
    import weakref

    from compress.training import SeparateLosses, train_loop

    live, most, gradients = [0], [0], {}

    class Saved:
        def __init__(self, tensor):
            self.tensor = tensor
            live[0] += 1
            most[0] = max(most[0], live[0])
            weakref.finalize(self, lambda: live.__setitem__(0, live[0] - 1))

    def loss_fn(wrapped, batch):
        parts = [
            lambda shift=shift: wrapped(input_ids=batch.roll(shift, 1), labels=batch).loss / 3 for shift in (0, 1, 2)
        ]
        return (SeparateLosses(parts) if separate else sum(part() for part in parts)), {}

    for name, p in model.named_parameters():
        p.requires_grad_("mlp" in name)
        if p.requires_grad:  # the last accumulation is the step's whole gradient (before clipping)
            p.register_post_accumulate_grad_hook(lambda p, name=name: gradients.__setitem__(name, p.grad.clone()))
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
        train_loop(
            model,
            [{"params": params, "lr": 1e-3}],
            windows,
            steps=1,
            batch_size=4,
            schedule="constant",
            warmup_steps=0,
            max_grad_norm=1.0,
            loss_fn=loss_fn,
            progress=False,
        )
    return gradients, most[0]


def test_separate_losses_give_their_sums_gradient_with_one_graph_alive():
    import copy

    from tests.tiny import make_tiny_llama

    model = make_tiny_llama()
    windows = _learnable_windows(n=8)
    summed, most_summed = _one_step(copy.deepcopy(model), windows, separate=False)
    separate, most_separate = _one_step(copy.deepcopy(model), windows, separate=True)
    assert len(summed) == 6 and summed.keys() == separate.keys()
    for name, gradient in summed.items():
        assert gradient.abs().max() > 0 and torch.allclose(separate[name], gradient, rtol=1e-5, atol=1e-8), name
    assert most_separate <= most_summed / 2.5  # three graphs at once when summed, one at a time when separate
