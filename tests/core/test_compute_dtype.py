"""calibration.compute_dtype: the calibration passes' products under torch.autocast, the rest in full precision."""

import pytest
import torch

import compress
from compress.activations import calibrate_sequentially
from compress.lowrank_math import truncated_svd_factors
from compress.modules import LowRankLinear
from compress.targets import replace_module, select_modules
from tests.core.test_offload import STAGES, stage_recipe
from tests.tiny import make_tiny_llama


@pytest.mark.parametrize("stage", list(STAGES))
def test_bfloat16_passes_give_a_close_model_in_float32(stage, smol_tokenizer):
    """Sub-layer passes, sensitivity backward, elastic variants and layer training under bf16 autocast: the
    model differs from the float32 passes' (the products were rounded) but by little, and keeps float32 weights."""
    models, passes = {}, []
    for compute in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = make_tiny_llama(vocab_size=len(smol_tokenizer), layers=3, tie=True)

        def record(module, args, compute=compute):  # autocast on in the passes, its cache of cast weights off
            passes.append((compute, torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled()))

        model.model.layers[1].mlp.register_forward_pre_hook(record)
        models[compute] = compress.compress(
            model, stage_recipe(STAGES[stage], compute_dtype=compute), tokenizer=smol_tokenizer, progress=False
        )
        assert models[compute].compression.stages[0].summary["calibration"]["compute_dtype"] == compute
        assert {p.dtype for p in models[compute].parameters()} == {torch.float32}
    seen = {(compute, autocast) for compute, autocast, _ in passes}
    assert ("bfloat16", True) in seen and ("float32", True) not in seen
    # the cache would keep a bf16 copy of every layer walked (a streamed model's too)
    assert not any(cached for _, autocast, cached in passes if autocast)
    ids = torch.randint(3, len(smol_tokenizer), (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, rounded = (models[c](input_ids=ids).logits for c in ("float32", "bfloat16"))
    assert not torch.equal(full, rounded)
    assert (rounded - full).norm() / full.norm() < 0.05


def test_statistics_products_are_not_rounded_by_the_autocast_around_the_passes():
    """Under bf16 autocast, float32 statistics products agree with float64 ones on the same passes: the
    accumulation runs with autocast off (bf16 products would be about 1e-3 off)."""
    windows = torch.randint(3, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    seen = {}
    for dtype in (torch.float32, torch.float64):
        model = make_tiny_llama()
        stats = seen[dtype] = {}

        def on_layer(index, layer_modules, layer_stats, model=model, stats=stats):
            for name, module in layer_modules.items():
                stats[name] = layer_stats[name]
                A, B = truncated_svd_factors(module.weight, 4)
                replace_module(model, name, LowRankLinear.from_factors(A, B, module.bias))

        with torch.autocast("cpu", dtype=torch.bfloat16):
            calibrate_sequentially(
                model,
                select_modules(model, [r"re:.*\.(q|k|v|o|gate|up|down)_proj$"]),
                windows,
                on_layer,
                sequential=True,
                sublayer=True,
                cross=True,
                batch_size=4,
                statistics_dtype=dtype,
            )
    for name, got in seen[torch.float32].items():
        want = seen[torch.float64][name]
        for key in ("cov", "cross"):
            scale = want[key].abs().max()
            assert (got[key] - want[key]).abs().max() <= 1e-5 * scale, (name, key)


def test_the_sensitivity_tail_casts_the_head_once_under_autocast():
    """The sensitivity pass's tail (final norm, head, loss) runs under the passes' autocast with its cache of
    cast weights on (the head's weight cast once, not per chunk of tokens), and leaves the cache off after."""
    from compress.activations import ResidentLayers, sensitivity_walk

    model = make_tiny_llama(layers=2)
    seen = []
    model.lm_head.register_forward_pre_hook(
        lambda m, a: seen.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled()))
    )
    modules = select_modules(model, [r"re:.*\.(q|k|v|o|gate|up|down)_proj$"])
    windows = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        sensitivity_walk(model, modules, windows, ResidentLayers(), lambda *args: None)
        assert not torch.is_autocast_cache_enabled()
    assert seen and all(enabled and cached for enabled, cached in seen)


def _ops():
    """Each matmul op with float32 weights, as a function of x, and its float64 reference."""
    from compress.kernels import dense_sparse_linear, lowrank_linear, lowrank_sparse_linear

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(12, 4, generator=g), torch.randn(4, 16, generator=g)
    D, values = torch.randn(12, 8, generator=g), torch.randn(2, 16, generator=g)
    indices = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(16)], dim=1).to(torch.int32)
    S = torch.zeros(8, 16, dtype=torch.float64).scatter_(0, indices.long(), values.double())
    sc_values, sc_channels = torch.randn(12, 3, generator=g), torch.tensor([1, 5, 9])
    return {
        "lowrank": (lambda x: lowrank_linear(x, A, B), lambda x: x @ B.double().T @ A.double().T),
        "dense_sparse": (lambda x: dense_sparse_linear(x, D, values, indices, 8), lambda x: x @ S.T @ D.double().T),
        "lowrank_sparse": (
            lambda x: lowrank_sparse_linear(x, A, B, sc_values, sc_channels),
            lambda x: x @ B.double().T @ A.double().T + x[:, sc_channels] @ sc_values.double().T,
        ),
    }


@pytest.mark.parametrize("op", ["lowrank", "dense_sparse", "lowrank_sparse"])
def test_each_op_takes_autocast_inputs_beside_float32_weights(op):
    """Autocast hands a replaced module half-precision inputs (an attention's output): the op computes, as
    nn.Linear does there, where outside autocast mixed dtypes stay an error."""
    run, reference = _ops()[op]
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(x)
    want = reference(x.double())
    assert (y.double() - want).norm() / want.norm() < 2e-2
    with pytest.raises(TypeError, match="dtype"):
        run(x)
